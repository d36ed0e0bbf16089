-- Read up to `count` new entries, highest band first, and start them: one round trip per pull.
-- Runs after starter.lua (see queue.py: _script).
local out, want = {}, tonumber(ARGV[8])
for band = 1, #KEYS - 2 do
  while want > 0 do
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want,
      'STREAMS', KEYS[2 + band], '>')
    if not reply then break end
    for _, e in ipairs(reply[1][2]) do
      local f, ticket, payload = e[2], '', ''
      for i = 1, #f, 2 do
        if f[i] == 'ticket' then ticket = f[i + 1] elseif f[i] == 'payload' then payload = f[i + 1] end
      end
      if start_entry(band, e[1], ticket) == 'run' then
        table.insert(out, band - 1); table.insert(out, e[1])
        table.insert(out, ticket); table.insert(out, payload)
        want = want - 1
      end
    end
  end
end
return out
