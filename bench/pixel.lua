-- wrk script: the collector's request mix, rotated per request, statuses counted.
--
-- wrk -s bench/pixel.lua URL -- DATAFILE [DELAY_MS]
-- DATAFILE (written by bench/mix.py) has tab-separated lines:
--   U <user agent> | C <consented Cookie header> | N <unconsented Cookie header, may be empty>
--   P <query string> | I <client IP for X-Forwarded-For>
-- Every 10 requests, 7 carry a consented cookie (index-based, so the share is exact).
-- A 200 is counted as consented when it sets a visitor cookie that does not expire
-- (Max-Age=0 is the "forget me" answer to a visitor without statistics consent).

local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

local uas, yes, no, pages, ips = {}, {}, {}, {}, {}
local n = 0
sent_yes, sent_no, ok, ok_yes, other = 0, 0, 0, 0, 0

function init(args)
  for line in io.lines(args[1]) do
    local kind, value = line:match("^(%a)\t(.*)$")
    if kind == "U" then table.insert(uas, value)
    elseif kind == "C" then table.insert(yes, value)
    elseif kind == "N" then table.insert(no, value)
    elseif kind == "P" then table.insert(pages, value)
    elseif kind == "I" then table.insert(ips, value)
    end
  end
  math.randomseed(1000 + (id or 0))
  local delay_ms = tonumber(args[2] or "0")
  if delay_ms > 0 then
    function delay() return delay_ms end
  end
end

function request()
  n = n + 1
  local headers = {
    ["User-Agent"] = uas[math.random(#uas)],
    ["X-Forwarded-For"] = ips[math.random(#ips)],
  }
  local cookie
  if n % 10 < 7 then
    -- A consented visitor is one browser: the same cookies, user agent and address on
    -- every hit (bench/mix.py, Mix.visitor).
    local k = math.random(#yes)
    cookie = yes[k]
    headers["User-Agent"] = uas[(k - 1) % #uas + 1]
    headers["X-Forwarded-For"] = ips[(k - 1) % #ips + 1]
    sent_yes = sent_yes + 1
  else
    cookie = no[math.random(#no)]
    sent_no = sent_no + 1
  end
  if cookie ~= "" then headers["Cookie"] = cookie end
  return wrk.format("GET", "/p.gif?" .. pages[math.random(#pages)], headers)
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    local sc = headers["set-cookie"] or headers["Set-Cookie"]
    if sc and not sc:find("Max-Age=0", 1, true) then ok_yes = ok_yes + 1 end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local t = {sent_yes = 0, sent_no = 0, ok = 0, ok_yes = 0, other = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + thread:get(k) end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
      .. '"ok": %d, "ok_consented": %d, "other_status": %d, "sent_consented": %d, '
      .. '"sent_unconsented": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, t.ok, t.ok_yes, t.other, t.sent_yes, t.sent_no,
    e.connect + e.read + e.write + e.status + e.timeout))
end
