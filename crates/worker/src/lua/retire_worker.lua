-- Removes a worker's registration: its jobs fetched but not acknowledged go back to the active list (those whose
-- data is gone are dropped: fetching them would fail every fetch; PostgreSQL still has their orders), then its
-- in-flight set, its entry in the workers set and its metadata hash are deleted.
-- With ARGV[3] >= 0 the worker is retired only if its last heartbeat is at least ARGV[3] seconds old, so a
-- worker that came back to life is left alone. Returns the jobs given back, or -1 if the worker is alive.
-- KEYS[1]: workers set   KEYS[2]: its in-flight set   KEYS[3]: its metadata hash   KEYS[4]: active list
-- KEYS[5]: data hash   KEYS[6]: signal list
-- ARGV[1]: worker name   ARGV[2]: now (unix seconds)   ARGV[3]: least silence in seconds, or -1
local silence = tonumber(ARGV[3])
if silence >= 0 then
    local last = redis.call("zscore", KEYS[1], ARGV[1])
    if last and tonumber(last) > tonumber(ARGV[2]) - silence then
        return -1
    end
end
local back = {}
for _, id in ipairs(redis.call("smembers", KEYS[2])) do
    if redis.call("hexists", KEYS[5], id) == 1 then
        back[#back + 1] = id
    end
end
for first = 1, #back, 1000 do
    redis.call("rpush", KEYS[4], unpack(back, first, math.min(first + 999, #back)))
end
if #back > 0 then
    redis.call("del", KEYS[6])
    redis.call("lpush", KEYS[6], 1)
end
redis.call("del", KEYS[2], KEYS[3])
redis.call("zrem", KEYS[1], ARGV[1])
return #back
