-- ARGV: node -> 1 if the node was not tracked (reaped, or Redis lost it):
-- its peers must then be registered again
return beat(ARGV[5])
