-- KEYS: ticket hash, stream, dlq, app.  ARGV: group, entry id, reason, default max deliveries,
-- tombstone s, channel
-- Runs after lib.lua (see queue.py: _script).
local state = redis.call('HGET', KEYS[1], 'state')
if not live(state) or redis.call('HGET', KEYS[1], 'entry_id') ~= ARGV[2] then
  ack(KEYS[2], ARGV[1], ARGV[2])
  return 'skip'
end
redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
local d = tonumber(redis.call('HGET', KEYS[1], 'deliveries'))
local max = tonumber(redis.call('HGET', KEYS[4], 'max_deliveries') or ARGV[4])
if d >= max then
  dead_letter(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2],
    'failed ' .. d .. ' times; last: ' .. ARGV[3], ARGV[5], ARGV[6])
  return 'dead'
end
local ticket = redis.call('HGET', KEYS[1], 'ticket')
local nid = redis.call('XADD', KEYS[2], '*', 'ticket', ticket, 'payload', payload_of(KEYS[2], ARGV[2]))
ack(KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'entry_id', nid, 'state', 'QUEUED')
redis.call('PUBLISH', ARGV[6], ticket .. ' QUEUED')
return 'retry'
