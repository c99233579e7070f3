-- Forgets up to ARGV[2] finished jobs: pops their ids from the done and dead sets, then deletes each one's data
-- entry and metadata hash. apalis-redis keeps all three for ever; PostgreSQL holds the orders' history.
-- An id reaches these sets only when its job was acknowledged for good, and job ids are never reused, so
-- nothing that may still be fetched loses its data here.
-- KEYS[1]: done set   KEYS[2]: dead set   KEYS[3]: data hash
-- ARGV[1]: metadata key prefix (`<queue>:meta`)   ARGV[2]: most jobs to forget
local limit = tonumber(ARGV[2])
local removed = 0
for _, finished in ipairs({KEYS[1], KEYS[2]}) do
    if removed >= limit then
        break
    end
    local ids = redis.call("spop", finished, limit - removed)
    if #ids > 0 then
        redis.call("hdel", KEYS[3], unpack(ids))
        local metas = {}
        for i, id in ipairs(ids) do
            metas[i] = ARGV[1] .. ":" .. id
        end
        redis.call("del", unpack(metas))
        removed = removed + #ids
    end
end
return removed
