-- Forgets job data no container refers to any more, one HSCAN page per call: the data of a job whose id was lost
-- (evicted or deleted from the active list, the scheduled set or a done set). Every apalis-redis script moves an
-- id between containers atomically, so between two scripts a live job's id is in exactly one of them: the active
-- list, the scheduled set, a registered worker's in-flight set, the done set or the dead set. The order of a
-- forgotten job is re-pushed by the reconciler from PostgreSQL.
-- KEYS[1]: data hash   KEYS[2]: active list   KEYS[3]: scheduled set   KEYS[4]: done set   KEYS[5]: dead set
-- KEYS[6]: workers set
-- ARGV[1]: HSCAN cursor   ARGV[2]: HSCAN count   ARGV[3]: metadata key prefix   ARGV[4]: in-flight key prefix
-- Returns {next cursor, then two values per forgotten job: its id, its order id (or "")}.
local page = redis.call("hscan", KEYS[1], ARGV[1], "COUNT", tonumber(ARGV[2]))
local entries = page[2]
local out = {page[1]}
local workers, active

for i = 1, #entries, 2 do
    local id, raw = entries[i], entries[i + 1]
    local held = redis.call("zscore", KEYS[3], id) ~= false
        or redis.call("sismember", KEYS[4], id) == 1
        or redis.call("sismember", KEYS[5], id) == 1
    if not held then
        workers = workers or redis.call("zrange", KEYS[6], 0, -1)
        for _, worker in ipairs(workers) do
            if redis.call("sismember", ARGV[4] .. ":" .. worker, id) == 1 then
                held = true
                break
            end
        end
    end
    if not held then
        if not active then
            active = {}
            for _, queued in ipairs(redis.call("lrange", KEYS[2], 0, -1)) do
                active[queued] = true
            end
        end
        held = active[id] == true
    end
    if not held then
        redis.call("hdel", KEYS[1], id)
        redis.call("del", ARGV[3] .. ":" .. id)
        local ok, job = pcall(cjson.decode, raw)
        local order_id = ""
        if ok and type(job) == "table" and type(job.order_id) == "string" then
            order_id = job.order_id
        end
        out[#out + 1] = id
        out[#out + 1] = order_id
    end
end
return out
