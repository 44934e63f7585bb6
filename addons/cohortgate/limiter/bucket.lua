-- cohortgate: token buckets, refilled and charged in one atomic step, for a batch of decisions.
--
-- KEYS[i]  the hash of operation i's customer, "cg:{<hash of sub>}:b", fields:
--            r   requests level      t   tokens level      at   time of the levels, microseconds
--          absent = both buckets full. A key may appear more than once: operations run in order.
-- ARGV[1]  now in microseconds, or "" to use the server's TIME (tests move time with it)
-- ARGV[2 + 4(i-1) ...]  operation i: mode ("acquire" or "settle"), requests per minute (the
--          requests capacity), tokens per minute (the tokens capacity), amount (acquire: the
--          tokens to reserve; settle: actual - reserved tokens, may be negative)
--
-- Returns, per operation, {refused, requests level, tokens level}, flattened: refused is 0
-- (taken), 1 (requests) or 2 (tokens); levels are strings, because Redis truncates a Lua number
-- reply to an integer.

local EPSILON = 1e-9           -- same as base.EPSILON: doubles may miss an exact refill
local TTL_MARGIN_MS = 1000     -- keep the key a little past the moment both buckets are full
local MICROS_PER_MINUTE = 60000000

if #ARGV ~= 1 + 4 * #KEYS then
  return redis.error_reply("cohortgate bucket.lua: expected 4 arguments per key")
end

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local time = redis.call("TIME")
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local function step(key, mode, rpm, tpm, amount)
  local state = redis.call("HMGET", key, "r", "t", "at")
  local requests = tonumber(state[1])
  local tokens = tonumber(state[2])
  local at = tonumber(state[3])
  if requests == nil or tokens == nil or at == nil then
    requests, tokens, at = rpm, tpm, now
  else
    local elapsed = now - at
    if elapsed > 0 then
      at = now
    else
      elapsed = 0  -- a clock that went backwards refills nothing and keeps the later time
    end
    requests = math.min(rpm, requests + elapsed * rpm / MICROS_PER_MINUTE)
    tokens = math.min(tpm, tokens + elapsed * tpm / MICROS_PER_MINUTE)
  end

  local function store()
    if requests >= rpm and tokens >= tpm then
      redis.call("DEL", key)  -- full is the same as absent
      return
    end
    redis.call("HSET", key,
      "r", string.format("%.17g", requests),
      "t", string.format("%.17g", tokens),
      "at", string.format("%.0f", at))
    local until_full = math.max((rpm - requests) / rpm, (tpm - tokens) / tpm) * MICROS_PER_MINUTE
    redis.call("PEXPIRE", key, math.ceil(until_full / 1000) + TTL_MARGIN_MS)
  end

  local refused = 0
  if mode == "acquire" then
    if requests < 1 - EPSILON then
      refused = 1
    elseif tokens < amount - EPSILON then
      refused = 2
    else
      requests = requests - 1
      tokens = tokens - amount
      store()
    end
  else  -- "settle" (the modes are checked before any step runs)
    tokens = math.min(tpm, tokens - amount)
    store()
  end
  return refused, string.format("%.17g", requests), string.format("%.17g", tokens)
end

-- check every mode first: a batch runs whole or not at all
for i = 1, #KEYS do
  local mode = ARGV[4 * i - 2]
  if mode ~= "acquire" and mode ~= "settle" then
    return redis.error_reply("cohortgate bucket.lua: unknown mode " .. tostring(mode))
  end
end

local reply = {}
for i = 1, #KEYS do
  local base = 4 * i - 2
  local refused, requests, tokens = step(KEYS[i], ARGV[base], tonumber(ARGV[base + 1]),
    tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]))
  reply[#reply + 1] = refused
  reply[#reply + 1] = requests
  reply[#reply + 1] = tokens
end
return reply
