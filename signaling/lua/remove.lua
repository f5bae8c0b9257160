-- ARGV: prefix, id
drop(ARGV[2], false)
return trans
