-- Shared Lua helpers, prepended to the scripts that end or dead-letter a ticket.
local function ack(stream, group, id)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
local function settle(th, state, err, tomb, channel)
  redis.call('HSET', th, 'state', state, 'error', err)
  local keep = tonumber(redis.call('HGET', th, 'ttl_s') or '0') + tonumber(tomb)
  redis.call('EXPIRE', th, keep)
  local idem = redis.call('HGET', th, 'idem')
  if idem and idem ~= '' then redis.call('EXPIRE', idem, keep) end
  redis.call('PUBLISH', channel, redis.call('HGET', th, 'ticket') .. ' ' .. state)
end
local function payload_of(stream, id)
  local e = redis.call('XRANGE', stream, id, id)
  if not e[1] then return '' end
  local f = e[1][2]
  for i = 1, #f, 2 do if f[i] == 'payload' then return f[i + 1] end end
  return ''
end
local function dead_letter(th, stream, dlq, group, id, reason, tomb, channel)
  redis.call('XADD', dlq, '*', 'ticket', redis.call('HGET', th, 'ticket'),
    'payload', payload_of(stream, id), 'reason', reason)
  ack(stream, group, id)
  settle(th, 'FAILED', reason, tomb, channel)
end
local function live(state) return state == 'QUEUED' or state == 'RUNNING' end
