-- ARGV: id, the calling node, then frames: messages that reached the
-- calling node for a peer no longer connected to it.  Queued if the peer is
-- in its grace period, published to its node if it is on another one, else
-- dropped -> how many were passed on.  (Those held at the loss of its
-- socket go with settle instead.)
local id = ARGV[5]
local p = get(id)
if not p then return 0 end
local n = 0
if p.o == 0 then
  for i = 7, #ARGV do if send(id, p, ARGV[i]) > 0 then n = n + 1 end end
elseif p.n ~= ARGV[6] then
  for i = 7, #ARGV do redis.call('PUBLISH', P .. 'to:' .. p.n, id .. '\n' .. ARGV[i]); n = n + 1 end
end
return n
