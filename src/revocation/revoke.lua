-- Records a revocation watermark in one step: raises the user's key (never
-- lowers it, and resets its expiry when it moves) and appends the new value
-- to the log, trimming entries older than the keep time.
--
-- KEYS[1] the user's watermark   KEYS[2] the log (a stream)
-- KEYS[3] the log's epoch
-- ARGV[1] the epoch the caller knows   ARGV[2] pool   ARGV[3] sub
-- ARGV[4] revoked_before (seconds)     ARGV[5] seconds to keep it
--
-- Returns {'raised', <stream id>}, {'kept', <higher watermark>}, or
-- {'epoch', <epoch or ''>} when the log is not the one the caller knows
-- (lost and recreated): nothing is written then.

local epoch = redis.call('GET', KEYS[3])
if epoch ~= ARGV[1] then
  return {'epoch', epoch or ''}
end
local revoked_before = tonumber(ARGV[4])
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= revoked_before then
  return {'kept', current}
end
local keep = tonumber(ARGV[5])
redis.call('SET', KEYS[1], ARGV[4], 'EX', keep)
local now = redis.call('TIME')
local oldest = string.format('%d', (tonumber(now[1]) - keep) * 1000)
local id = redis.call('XADD', KEYS[2], 'MINID', '~', oldest, '*',
  'pool', ARGV[2], 'sub', ARGV[3], 'before', ARGV[4])
return {'raised', id}
