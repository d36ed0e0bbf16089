-- KEYS: ticket hash, result, stream, completion counter, duplicate counter
-- ARGV: group, entry id, response, tombstone s, channel, counter ttl
-- Runs after lib.lua (see queue.py: _script).
local state = redis.call('HGET', KEYS[1], 'state')
ack(KEYS[3], ARGV[1], ARGV[2])
if not live(state) then
  if state and state ~= 'CANCELLED' then redis.call('INCR', KEYS[5]) end
  return 0
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s'))
redis.call('SET', KEYS[2], ARGV[3], 'EX', ttl)
settle(KEYS[1], 'DONE', '', ARGV[4], ARGV[5])
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], ARGV[6])
return 1
