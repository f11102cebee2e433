-- POST /cluster with the 9 seed titles (wrk -s bench/wrk/cluster.lua URL).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"sentences": ["Dog Walking: 10 Simple Steps", "The Secrets of Dog Walking", ' ..
  '"Why You Need To Dog Walking", "The Art of Dog Walking", "The Joy of Dog Walking", ' ..
  '"Public Speaking For The Modern Age", "Learn The Art of Public Speaking", ' ..
  '"Master The Art of Public Speaking", "The Best Way To Public Speaking"]}'
