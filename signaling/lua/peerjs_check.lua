-- PeerJS clients.  ARGV: id, a token digest (hex) -> 1 if the id is held,
-- or in its grace period, by the very connection whose client presented a
-- token with that digest (peerjs_claim), else 0.  (Connection names are
-- never reused: a record left from an earlier holder cannot match.)
local p = get(ARGV[5])
if not p then return 0 end
if redis.call('GET', P .. 'peerjs:' .. ARGV[5]) == ARGV[6] .. ':' .. p.c then return 1 end
return 0
