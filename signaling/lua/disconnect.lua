-- ARGV: sender, to
local a, b, err = pair(ARGV[5], ARGV[6])
if err then return err end
if a.t ~= ARGV[6] then return {'not-pointing'} end
set(ARGV[5], a, 'idle', '')
if b.t == ARGV[5] then set(ARGV[6], b, 'idle', '') end
return trans
