-- ARGV: sender, to
local a, b, err = pair(ARGV[4], ARGV[5])
if err then return err end
if a.t ~= ARGV[5] then return {'not-pointing'} end
set(ARGV[4], a, 'idle', '')
if b.t == ARGV[4] then set(ARGV[5], b, 'idle', '') end
return trans
