-- Deletes a worker's metadata hash if the worker is no longer registered. apalis-redis removes a dead worker
-- from the workers set but never deletes its metadata hash, so each crashed worker would leave one behind.
-- KEYS[1]: workers set   KEYS[2]: the metadata hash
-- ARGV[1]: worker name
if redis.call("zscore", KEYS[1], ARGV[1]) then
    return 0
end
return redis.call("del", KEYS[2])
