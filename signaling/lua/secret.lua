-- ARGV: a new random secret -> the cluster's resume secret (the first
-- node's, kept)
redis.call('SET', P .. 'resume-secret', ARGV[5], 'NX')
return redis.call('GET', P .. 'resume-secret')
