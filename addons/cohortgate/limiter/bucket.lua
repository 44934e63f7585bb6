-- cohortgate: both token buckets of one customer, refilled and charged in one atomic step.
--
-- KEYS[1]  the customer's hash, "cg:{<hash of sub>}:b" (one Cluster slot), fields:
--            r   requests level      t   tokens level      at   time of the levels, microseconds
--          absent = both buckets full.
-- ARGV[1]  "acquire" or "settle"
-- ARGV[2]  requests per minute (requests capacity)
-- ARGV[3]  tokens per minute (tokens capacity)
-- ARGV[4]  acquire: the tokens to reserve; settle: actual - reserved tokens (may be negative)
-- ARGV[5]  now in microseconds, or "" to use the server's TIME (tests move time with it)
--
-- Returns {refused, requests level, tokens level}: refused is 0 (taken), 1 (requests) or
-- 2 (tokens); levels are strings, because Redis truncates a Lua number reply to an integer.

local EPSILON = 1e-9           -- same as base.EPSILON: doubles may miss an exact refill
local TTL_MARGIN_MS = 1000     -- keep the key a little past the moment both buckets are full
local MICROS_PER_MINUTE = 60000000

local key = KEYS[1]
local mode = ARGV[1]
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local now
if ARGV[5] ~= "" then
  now = tonumber(ARGV[5])
else
  local time = redis.call("TIME")
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

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
elseif mode == "settle" then
  tokens = math.min(tpm, tokens - amount)
  store()
else
  return redis.error_reply("cohortgate bucket.lua: unknown mode " .. tostring(mode))
end

return {refused, string.format("%.17g", requests), string.format("%.17g", tokens)}
