-- PeerJS clients (signaling/peerjs_protocol.py).  ARGV: id, the digest of
-- its client's token (hex), the connection that holds it, seconds -> 1.
-- Records that the client on that connection presented that token: the
-- same token may take the id back from any node while that connection holds
-- it, or while its grace period lasts (peerjs_check).  Kept at most the
-- given seconds (a backstop: peerjs_release ends it sooner).
redis.call('SET', P .. 'peerjs:' .. ARGV[5], ARGV[6] .. ':' .. ARGV[7], 'EX', tonumber(ARGV[8]))
return 1
