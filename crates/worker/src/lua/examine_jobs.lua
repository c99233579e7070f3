-- Examines up to ARGV[4] entries of one container of job ids (the active list, the scheduled set or a worker's
-- in-flight set) and removes or repairs each one apalis-redis 1.0's fetch cannot read. That fetch moves a batch
-- of ids to the worker's in-flight set, then fails on the first unreadable entry, and the whole consumer with it;
-- the entry stays, so every later fetch fails the same way. An entry is unreadable when Redis lost part of it
-- (eviction, a key deleted by hand, a failover to a replica that had not received the last writes) or when it
-- holds something that is not a job:
--   * its data is intact but its metadata hash is missing or incomplete: the metadata is written again (the
--     readable fields kept, the others 0 attempts, 25 at most, Pending): repaired, the job stays;
--   * anything else (no data, data that is not a job, an id that is not one, an id twice in the list): the entry
--     leaves the container with its data and metadata; the reconciler re-pushes its order from PostgreSQL.
-- A container or data hash holding another type (a foreign value under a queue key) is deleted.
-- KEYS[1]: the container   KEYS[2]: the data hash
-- ARGV[1]: metadata key prefix (`<queue>:meta`)   ARGV[2]: the container's type: "list", "zset" or "set"
-- ARGV[3]: first index (list and zset)   ARGV[4]: most entries to examine
-- Returns {next index, or 0 once the end was reached, then four values per finding: the job id (or the key),
-- the problem, the order id (or ""), what was done}.
local container, data = KEYS[1], KEYS[2]
local prefix, kind = ARGV[1], ARGV[2]
local first, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {0}
local uuid = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"
local statuses = {Pending = true, Queued = true, Running = true, Done = true, Failed = true, Killed = true}

local function found(what, problem, order_id, action)
    out[#out + 1] = what
    out[#out + 1] = problem
    out[#out + 1] = order_id
    out[#out + 1] = action
end

local function type_of(key)
    return redis.call("type", key)["ok"]
end

for _, expected in ipairs({{container, kind}, {data, "hash"}}) do
    local actual = type_of(expected[1])
    if actual ~= "none" and actual ~= expected[2] then
        redis.call("del", expected[1])
        found(expected[1], "wrong_type", "", "deleted")
    end
end

local ids
if kind == "list" then
    ids = redis.call("lrange", container, first, first + limit - 1)
elseif kind == "zset" then
    ids = redis.call("zrange", container, first, first + limit - 1)
else
    ids = redis.call("smembers", container)
end

local removed = 0
local function remove(id, problem, order_id, count)
    if kind == "list" then
        redis.call("lrem", container, count, id)
    elseif kind == "zset" then
        redis.call("zrem", container, id)
    else
        redis.call("srem", container, id)
    end
    removed = removed + 1
    found(id, problem, order_id, "removed")
end

local function counter(value)
    return value and #value <= 9 and string.match(value, "^%d+$") ~= nil
end

local seen = {}
for _, id in ipairs(ids) do
    local meta_key = prefix .. ":" .. id
    if seen[id] then
        -- The same job twice: the first ack would remove it from the in-flight set and the second would fail.
        remove(id, "duplicate", seen[id], -1)
    elseif #id ~= 26 or string.find(id, "[^0-9A-HJKMNP-TV-Z]") then
        redis.call("hdel", data, id)
        remove(id, "bad_id", "", 0)
    else
        local raw = redis.call("hget", data, id)
        local ok, job = false, nil
        if raw then
            ok, job = pcall(cjson.decode, raw)
        end
        if not raw then
            redis.call("del", meta_key)
            remove(id, "no_data", "", 0)
        elseif not ok or type(job) ~= "table" or type(job.order_id) ~= "string"
            or not string.match(job.order_id, uuid) then
            redis.call("hdel", data, id)
            redis.call("del", meta_key)
            remove(id, "bad_data", "", 0)
        else
            seen[id] = job.order_id
            local meta_type = type_of(meta_key)
            if meta_type ~= "none" and meta_type ~= "hash" then
                redis.call("del", meta_key)
                meta_type = "none"
            end
            local meta = redis.call("hmget", meta_key, "attempts", "max_attempts", "status")
            if not (counter(meta[1]) and counter(meta[2]) and statuses[meta[3]]) then
                redis.call("hset", meta_key,
                    "attempts", counter(meta[1]) and meta[1] or "0",
                    "max_attempts", counter(meta[2]) and meta[2] or "25",
                    "status", statuses[meta[3]] and meta[3] or "Pending")
                found(id, meta_type == "none" and "no_meta" or "bad_meta", job.order_id, "repaired")
            end
        end
    end
end

if kind ~= "set" and #ids == limit then
    out[1] = first + #ids - removed
end
return out
