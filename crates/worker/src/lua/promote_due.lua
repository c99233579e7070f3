-- Moves up to ARGV[1] due jobs from the scheduled set to the active list, oldest first, as apalis-redis's fetch
-- does, but in bounded batches: its fetch moves every due job with one `unpack`, which Lua refuses above about
-- 8,000 values, and then every fetch of every worker fails.
-- KEYS[1]: scheduled set   KEYS[2]: active list   KEYS[3]: signal list
-- ARGV[1]: most jobs to move   ARGV[2]: now (unix seconds, the clock apalis scores with)
local ids = redis.call("zrangebyscore", KEYS[1], "-inf", ARGV[2], "LIMIT", 0, tonumber(ARGV[1]))
if #ids > 0 then
    redis.call("rpush", KEYS[2], unpack(ids))
    redis.call("zrem", KEYS[1], unpack(ids))
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return #ids
