-- lua/post.lua, plus a fresh Idempotency-Key on every request: "PREFIX-<thread>-<n>".
-- Usage: wrk -s post_keyed.lua URL -- BODY_FILE CONTENT_TYPE PREFIX (a PREFIX unique to the run)
-- PREFIX "-" sends no key, with the same per-request Lua work (the fair reference for a same-run ratio).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "post.lua")

local plain_init = init
local counter = 0
local prefix = ""
local thread_ids = 0

local plain_setup = setup
function setup(thread)
  plain_setup(thread)
  thread_ids = thread_ids + 1
  thread:set("thread_id", thread_ids)
end

local keyed = true

function init(args)
  plain_init(args)
  keyed = args[3] ~= "-"
  prefix = string.format('"%s-%d-', args[3], thread_id or 0)
end

function request()
  counter = counter + 1
  local headers = {}
  for k, v in pairs(wrk.headers) do
    headers[k] = v
  end
  if keyed then
    headers["Idempotency-Key"] = prefix .. counter .. '"'
  end
  return wrk.format(nil, nil, headers, nil)
end
