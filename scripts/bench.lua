-- wrk script for scripts/bench.
--
-- Requests BENCH_PATH for BENCH_PHASE_S seconds, then BENCH_TAIL_PATH until wrk stops. wrk
-- abandons the requests in flight when its time is up; with a tail path that does not count
-- (/readyz: the same Redis round trip as GET /, without INCR), no page view is ever abandoned,
-- so Redis' count must equal the 200 page views seen here exactly.
--
-- done() prints one JSON line: main-phase throughput, latency percentiles, errors, and the
-- number of "Hello World! N times." 200s.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1
local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local main_path = os.getenv("BENCH_PATH") or "/"
local tail_path = os.getenv("BENCH_TAIL_PATH") or main_path
local phase = tonumber(os.getenv("BENCH_PHASE_S") or "5")

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  main_request = wrk.format("GET", main_path)
  tail_request = wrk.format("GET", tail_path)
  started = now()
  stop_at = started + phase
  in_phase = 0   -- responses received during the main phase (all to main_path)
  pages = 0      -- 200 responses carrying a page view, whole run
  not_ok = 0     -- responses other than 200, whole run
end

function request()
  if now() < stop_at then
    return main_request
  end
  return tail_request
end

function response(status, headers, body)
  if now() < stop_at then
    in_phase = in_phase + 1
  end
  if status ~= 200 then
    not_ok = not_ok + 1
  elseif string.sub(body, 1, 13) == "Hello World! " then
    pages = pages + 1
  end
end

function done(summary, latency, requests)
  local in_phase_total, pages_total, not_ok_total = 0, 0, 0
  for _, thread in ipairs(threads) do
    in_phase_total = in_phase_total + thread:get("in_phase")
    pages_total = pages_total + thread:get("pages")
    not_ok_total = not_ok_total + thread:get("not_ok")
  end
  local e = summary.errors
  io.write(string.format(
    '{"rps": %.1f, "p50_us": %d, "p99_us": %d, "max_us": %d, "requests": %d, ' ..
    '"pages": %d, "not_ok": %d, "socket_errors": %d}\n',
    in_phase_total / phase, latency:percentile(50), latency:percentile(99), latency.max,
    summary.requests, pages_total, not_ok_total,
    e.connect + e.read + e.write + e.timeout))
end
