-- One fleet-wide reservation against Cognito's quota (GCRA), on Redis's clock.
-- KEYS[1] budget cell (hash: tat, iv)   KEYS[2] throttle (hash: rate, at)
-- KEYS[3] caller cell (hash: tat, iv), optional; for "probe", the probe's own key
-- ARGV: mode ("reserve" | "caller" | "throttled" | "probe": writes only KEYS[3]), rate, burst, max_wait_us,
--       caller_rate, caller_burst
-- Times are microseconds on Redis's TIME. Returns {granted, wait_us, cause, rate_milli}.
local mode = ARGV[1]
local configured = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local FACTOR, FLOOR, COOLDOWN, RECOVERY = 0.5, 0.1, 1000000, 0.1

local function current_rate()
  local p = redis.call('HMGET', KEYS[2], 'rate', 'at')
  if not p[1] then return configured end
  local quiet = math.floor((now - tonumber(p[2])) / 1000000)
  if quiet < 0 then quiet = 0 end
  return math.min(configured, tonumber(p[1]) + configured * RECOVERY * quiet)
end

-- A cell's TAT, rescaled to `iv` when the rate changed, so a lower rate frees no burst.
local function load(key, iv)
  local c = redis.call('HMGET', key, 'tat', 'iv')
  local tat = tonumber(c[1]) or now
  local old = tonumber(c[2]) or iv
  if tat > now and old ~= iv then tat = now + (tat - now) / old * iv end
  return tat
end

local function store(key, tat, iv)
  redis.call('HSET', key, 'tat', string.format('%.0f', tat), 'iv', string.format('%.6f', iv))
  redis.call('PEXPIRE', key, math.max(1, math.ceil((tat - now) / 1000)) + 1000)
end

-- A write of its own (KEYS[3]), so that a Redis that refuses writes
-- (out of memory, a read-only replica) fails the probe as it would fail a reservation.
if mode == 'probe' then
  redis.call('SET', KEYS[3], now, 'PX', 60000)
  return {1, 0, 'probe', math.floor(current_rate() * 1000)}
end

if mode == 'throttled' then
  local p = redis.call('HMGET', KEYS[2], 'at')
  if p[1] and now - tonumber(p[1]) < COOLDOWN then return {0, 0, 'cooldown', 0} end
  local slower = math.max(current_rate() * FACTOR, configured * FLOOR)
  redis.call('HSET', KEYS[2], 'rate', string.format('%.6f', slower), 'at', now)
  local recover_s = math.ceil((configured - slower) / (configured * RECOVERY)) + 1
  redis.call('EXPIRE', KEYS[2], recover_s)
  return {1, 0, 'throttled', math.floor(slower * 1000)}
end

local caller_at = now
local civ, ctat
if KEYS[3] then
  civ = 1000000 / tonumber(ARGV[5])
  ctat = load(KEYS[3], civ)
  caller_at = math.max(now, ctat - civ * (tonumber(ARGV[6]) - 1))
  if caller_at > now then return {0, caller_at - now, 'caller', 0} end
end

local rate = current_rate()
if mode == 'caller' then
  store(KEYS[3], math.max(ctat, now) + civ, civ)
  return {1, 0, 'ok', math.floor(rate * 1000)}
end

local iv = 1000000 / rate
local tat = load(KEYS[1], iv)
local at = math.max(now, tat - iv * (burst - 1))
local wait = at - now
if wait > max_wait then return {0, wait, 'wait', math.floor(rate * 1000)} end
store(KEYS[1], math.max(tat, at) + iv, iv)
if KEYS[3] then store(KEYS[3], math.max(ctat, now) + civ, civ) end
return {1, wait, 'ok', math.floor(rate * 1000)}
