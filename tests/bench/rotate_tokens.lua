-- wrk script for the cohortgate benchmarks: POST a small chat completion carrying one approval
-- token per request, round robin over the tokens file (one token a line), each thread from its
-- own offset. Bare mitmdump gets exactly the same requests.
--
--   wrk ... -s tests/bench/rotate_tokens.lua URL -- TOKENS_FILE [STOP_AFTER] [BODY]
--
-- STOP_AFTER > 0 ends the run once a thread has that many responses (the memory benchmark
-- counts requests, not seconds; run it with -t1). done() prints one `BENCH-JSON {...}` line for tests/bench/common.py.

local requests = {}
local count = 0
local responses = 0
local stop_after = 0
local next_index = 0

function setup(thread)
    thread:set("thread_index", next_index)
    next_index = next_index + 1
end

function init(args)
    local path = args[1]
    stop_after = tonumber(args[2] or "0") or 0
    local body = args[3] or
        '{"model":"gpt-5.6","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
    local headers = {["Content-Type"] = "application/json"}
    for token in io.lines(path) do
        if #token > 0 then
            headers["Authorization"] = "Bearer " .. token
            requests[#requests + 1] = wrk.format("POST", nil, headers, body)
        end
    end
    if #requests == 0 then
        error("no tokens in " .. path)
    end
    -- spread the threads over the customers: a prime stride, wrapped
    count = ((thread_index or 0) * 7919) % #requests
    if stop_after > 0 then
        -- defined only when needed: wrk parses responses for Lua only if `response` exists
        response = function(status, headers, body)
            responses = responses + 1
            if responses == stop_after then
                wrk.thread:stop()
                -- wrk's main thread sleeps out -d whatever the threads do; SIGINT (the Ctrl-C
                -- it handles) ends that sleep, and it prints its summary as usual; sent from the
                -- background, as system() ignores SIGINT in wrk until the shell returns
                os.execute("(sleep 0.1; kill -INT $PPID) &")
            end
        end
    end
end

function request()
    count = count + 1
    return requests[(count % #requests) + 1]
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH-JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
        '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
        '"mean_us":%.1f,"max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency.mean, latency.max, latency:percentile(50),
        latency:percentile(90), latency:percentile(99)))
end
