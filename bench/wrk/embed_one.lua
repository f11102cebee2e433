-- POST /embed with one short sentence, a different one on every request (wrk -s
-- bench/wrk/embed_one.lua URL): the query side of retrieval, one sentence per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local words = {"river", "garden", "morning", "quiet", "engineer", "music", "coffee", "market",
  "winter", "student", "ancient", "city", "bright", "forest", "paper", "window"}
local n = 0
request = function()
  n = n + 1
  local a = words[n % #words + 1]
  local b = words[(n * 7) % #words + 1]
  local body = '{"inputs": "the ' .. a .. ' ' .. b .. ' ' .. n .. '"}'
  return wrk.format(nil, "/embed", nil, body)
end
