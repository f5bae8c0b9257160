-- PeerJS clients.  ARGV: id, the record peerjs_claim made (digest:connection),
-- seconds -> 1 if that record was still the id's.  Its connection is gone:
-- the record is deleted (seconds = 0), or kept for the grace period only.
local key = P .. 'peerjs:' .. ARGV[5]
if redis.call('GET', key) ~= ARGV[6] then return 0 end
local seconds = tonumber(ARGV[7])
if seconds > 0 then redis.call('EXPIRE', key, seconds) else redis.call('DEL', key) end
return 1
