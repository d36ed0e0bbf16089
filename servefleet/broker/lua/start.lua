-- Start entries already delivered (reclaimed, or woken by a blocking read); their verdicts.
-- Runs after starter.lua (see queue.py: _script).
local out = {}
for i = 8, #ARGV, 3 do
  table.insert(out, start_entry(tonumber(ARGV[i]) + 1, ARGV[i + 1], ARGV[i + 2]))
end
return out
