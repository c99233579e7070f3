-- Deletes the metadata hashes, among those given, of jobs that have no data and are not finished: what is left of
-- a job whose data was lost (a finished job's metadata goes with its done entry, see purge_finished.lua).
-- KEYS[1]: data hash   KEYS[2]: done set   KEYS[3]: dead set
-- ARGV[1]: metadata key prefix with its colon (`<queue>:meta:`)   ARGV[2..]: metadata keys found by SCAN
-- Returns the ids whose metadata was deleted.
local deleted = {}
for i = 2, #ARGV do
    local key = ARGV[i]
    local id = string.sub(key, #ARGV[1] + 1)
    if redis.call("hexists", KEYS[1], id) == 0
        and redis.call("sismember", KEYS[2], id) == 0
        and redis.call("sismember", KEYS[3], id) == 0 then
        redis.call("del", key)
        deleted[#deleted + 1] = id
    end
end
return deleted
