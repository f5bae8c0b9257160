-- ARGV: id, node, connection ('' for any).  A peer that has resumed on
-- another connection since is not that connection's to remove.
local p = get(ARGV[4])
if p and ARGV[6] ~= '' and (p.n ~= ARGV[5] or p.c ~= ARGV[6]) then return trans end
drop(ARGV[4], false)
return trans
