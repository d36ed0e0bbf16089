-- KEYS: ticket hash, stream.  ARGV: tombstone s, channel
-- Runs after lib.lua (see queue.py: _script).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if not live(state) then return state end
if state == 'QUEUED' then redis.call('XDEL', KEYS[2], redis.call('HGET', KEYS[1], 'entry_id')) end
settle(KEYS[1], 'CANCELLED', 'cancelled by the client', ARGV[1], ARGV[2])
return 'CANCELLED'
