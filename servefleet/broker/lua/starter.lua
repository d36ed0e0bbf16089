-- Starting an entry: skip it if its ticket is final or it is a stale copy, dead-letter it when
-- delivered more than max_deliveries times, else mark it RUNNING. Shared by take.lua and start.lua.
-- KEYS: dlq, app, band streams...  ARGV: group, consumer, default max deliveries, tombstone s,
--       now, channel, ticket key prefix, then (take.lua) count or (start.lua) band/id/ticket triples
-- Runs after lib.lua (see queue.py: _script).
local function start_entry(band, id, ticket)
  local th, stream = ARGV[7] .. ticket, KEYS[2 + band]
  local state = redis.call('HGET', th, 'state')
  if not live(state) or redis.call('HGET', th, 'entry_id') ~= id then
    ack(stream, ARGV[1], id)
    return 'skip'
  end
  local d = redis.call('HINCRBY', th, 'deliveries', 1)
  local max = tonumber(redis.call('HGET', KEYS[2], 'max_deliveries') or ARGV[3])
  if d > max then
    local last = redis.call('HGET', th, 'last_error') or 'the worker running it stopped or died'
    dead_letter(th, stream, KEYS[1], ARGV[1], id,
      'gave up after ' .. max .. ' deliveries; last: ' .. last, ARGV[4], ARGV[6])
    return 'dead'
  end
  redis.call('HSET', th, 'state', 'RUNNING', 'worker', ARGV[2], 'started', ARGV[5],
    'last_error', 'worker ' .. ARGV[2] .. ' stopped or died while running it')
  redis.call('PUBLISH', ARGV[6], ticket .. ' RUNNING')
  return 'run'
end
