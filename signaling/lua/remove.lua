-- ARGV: id, node, connection ('' for any).  A peer that has resumed on
-- another connection since is not that connection's to remove.
local p = get(ARGV[5])
if p and ARGV[7] ~= '' and (p.n ~= ARGV[6] or p.c ~= ARGV[7]) then return trans end
drop(ARGV[5], false)
return trans
