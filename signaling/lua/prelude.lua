-- Shared by every script (prepended to each when loaded).  ARGV[1] is the
-- key prefix, ARGV[2] and ARGV[3] how many messages and bytes may be queued
-- for a peer in its grace period, ARGV[4] the grace period in ms; a
-- script's own arguments start at ARGV[5].  Peers are JSON in one hash; '' stands for 'no
-- target'; o = 0 marks a peer in its grace period (its socket was lost; it
-- may resume), c is the connection that holds it (on node n).  A script
-- that refuses returns {name}, a key of signaling.errors.REFUSALS; one that
-- succeeds returns trans, which starts with '' and lists the transitions it
-- made (peer, old, new, target).  A script that begins with a line
-- '-- @needs <part> ...' is given only those parts of this prelude (and
-- the parts they need): Redis runs the prelude at every call, and a relay
-- across nodes is one call.
local P = ARGV[1]
local QMAX = tonumber(ARGV[2])
local QBYTES = tonumber(ARGV[3])
local GRACE = tonumber(ARGV[4])
local PEERS = P .. 'peers'
local trans = {''}
-- @part get
local function get(id)
  local v = redis.call('HGET', PEERS, id)
  if v then return cjson.decode(v) end
  return nil
end
-- @part put
local function put(id, p) redis.call('HSET', PEERS, id, cjson.encode(p)) end
-- @part now_ms
-- the Redis clock in ms: one clock for every node's heartbeats and grace periods
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- @part beat (needs now_ms)
-- record that a node is alive; 1 if it was not tracked until now
local function beat(node) return redis.call('ZADD', P .. 'nodes', now_ms(), node) end
-- @part set (needs put)
local function set(id, p, state, target)
  table.insert(trans, id); table.insert(trans, p.s)
  table.insert(trans, state); table.insert(trans, target)
  if p.t ~= target then
    if p.t ~= '' then redis.call('SREM', P .. 'watch:' .. p.t, id) end
    if target ~= '' then redis.call('SADD', P .. 'watch:' .. target, id) end
  end
  p.s = state; p.t = target
  put(id, p)
end
-- @part forget_queue
-- a peer's queue (its grace period) is the list q:<id>, its size in bytes qb:<id>
local function forget_queue(id)
  redis.call('DEL', P .. 'q:' .. id, P .. 'qb:' .. id)
end
-- @part send
-- send a frame to a peer: published on its node's channel, or queued while
-- it is in its grace period -> receivers of the publish (1 if queued), or
-- -2 if its queue is full (the frame is dropped)
local function send(id, p, frame)
  if p.o == 0 then
    local q = P .. 'q:' .. id
    local bytes = tonumber(redis.call('GET', P .. 'qb:' .. id) or '0')
    if redis.call('LLEN', q) >= QMAX or bytes + #frame > QBYTES then return -2 end
    redis.call('RPUSH', q, frame)
    redis.call('INCRBY', P .. 'qb:' .. id, #frame)
    return 1
  end
  return redis.call('PUBLISH', P .. 'to:' .. p.n, id .. '\n' .. frame)
end
-- @part pass_on (needs send)
-- frames ARGV[first] onwards for a peer not connected to the calling node:
-- queued if it is in its grace period, published to its node if that is
-- another one, else dropped -> how many were passed on
local function pass_on(id, p, node, first)
  local n = 0
  if p.o == 0 then
    for i = first, #ARGV do if send(id, p, ARGV[i]) > 0 then n = n + 1 end end
  elseif p.n ~= node then
    for i = first, #ARGV do redis.call('PUBLISH', P .. 'to:' .. p.n, id .. '\n' .. ARGV[i]); n = n + 1 end
  end
  return n
end
-- @part suspend (needs put now_ms)
-- begin a peer's grace period (its socket was lost) -> its deadline (Redis ms)
local function suspend(id, p)
  p.o = 0
  put(id, p)
  redis.call('SREM', P .. 'node:' .. p.n, id)
  local deadline = now_ms() + GRACE
  redis.call('ZADD', P .. 'grace', deadline, id)
  return deadline
end
-- @part pair (needs get)
local function pair(a_id, b_id)
  local a = get(a_id)
  if not a then return nil, nil, {'not-registered'} end
  if a_id == b_id then return nil, nil, {'self'} end
  local b = get(b_id)
  if not b then return nil, nil, {'no-such-peer'} end
  return a, b, nil
end
-- @part paired (needs pair)
-- the offer/answer/ICE check: both registered, and the sender connected to the target
local function paired(a_id, b_id)
  local a, b, err = pair(a_id, b_id)
  if err then return nil, nil, err end
  if not (a.s == 'connected' and a.t == b_id) then
    return nil, nil, {'not-paired'}
  end
  return a, b, nil
end
-- @part drop (needs get set send forget_queue)
-- forget a peer (and its grace period and queue, if any); its watchers go
-- idle; with notify, they are sent peer_left
local function drop(id, notify)
  local p = get(id)
  if not p then return end
  redis.call('HDEL', PEERS, id)
  redis.call('SREM', P .. 'node:' .. p.n, id)
  if p.o == 0 then
    redis.call('ZREM', P .. 'grace', id)
    forget_queue(id)
  end
  if p.t ~= '' then redis.call('SREM', P .. 'watch:' .. p.t, id) end
  local left = cjson.encode({type = 'disconnect', from = id, data = {reason = 'peer_left'}})
  local watchers = redis.call('SMEMBERS', P .. 'watch:' .. id)
  table.sort(watchers)  -- in id order, as the in-memory registry reports them
  for _, w in ipairs(watchers) do
    local wp = get(w)
    if wp then
      set(w, wp, 'idle', '')
      if notify then send(w, wp, left) end
    end
  end
  redis.call('DEL', P .. 'watch:' .. id)
end
