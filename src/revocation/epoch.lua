-- The log's epoch: the one there, or ARGV[1] if there is none yet (a new
-- log, or one lost with a Redis restart that kept no data).
-- KEYS[1] the epoch key.
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
