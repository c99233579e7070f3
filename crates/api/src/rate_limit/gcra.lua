-- One rate limit decision, atomically: the generic cell rate algorithm (GCRA) over one key per route and client.
-- KEYS[1]: the key; ARGV[1]: the emission interval in ms (a minute / N); ARGV[2]: the burst (N).
-- The key holds the theoretical arrival time (TAT) of the next request, in ms of Redis's own clock, so that every
-- api process decides against the same time, and expires when the client's budget is full again.
-- Returns {allowed (1 or 0), requests left, ms until the next request may pass (0 when allowed)}.
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
-- This request may pass once the TAT is within the burst's tolerance of now.
local allow_at = tat + interval - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now}
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', next_tat - now)
return {1, math.floor((now + burst * interval - next_tat) / interval), 0}
