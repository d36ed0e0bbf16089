-- KEYS: app, target stream, ticket hash, idempotency key, submit counter, band streams...
-- ARGV: ticket, payload, ttl_s, max_age_s, default max length, default ttl, app, band,
--       use idempotency ('1'/'0'), created (unix s), counter ttl
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
if ARGV[9] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen then return {'dup', seen} end
end
local max = tonumber(redis.call('HGET', KEYS[1], 'max_stream_length') or ARGV[5])
local total = 0
for i = 6, #KEYS do total = total + redis.call('XLEN', KEYS[i]) end
if total >= max then return {'full', tostring(total), tostring(max)} end
local ttl = tonumber(ARGV[3])
if ttl <= 0 then ttl = tonumber(redis.call('HGET', KEYS[1], 'result_ttl_s') or ARGV[6]) end
local id = redis.call('XADD', KEYS[2], '*', 'ticket', ARGV[1], 'payload', ARGV[2])
local idem = ''
if ARGV[9] == '1' then
  idem = KEYS[4]
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
end
redis.call('HSET', KEYS[3], 'ticket', ARGV[1], 'app', ARGV[7], 'band', ARGV[8], 'entry_id', id,
  'state', 'QUEUED', 'ttl_s', ttl, 'created', ARGV[10], 'deliveries', 0, 'idem', idem)
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[11])
return {'ok', ARGV[1]}
