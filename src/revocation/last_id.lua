-- The log's last generated id ('0-0' when there is no log): an id lower
-- than one a replica has read means entries were lost. One script, so the
-- key cannot vanish between the check and XINFO.
-- KEYS[1] the log (a stream).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return '0-0'
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then
    return info[i + 1]
  end
end
return '0-0'
