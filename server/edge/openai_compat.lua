-- The edge's own checks, and every response made to look like OpenAI's.
--
-- On the way in (envoy_on_request), before the transcoder sees the request:
--   * ENDPOINTS is the one table of public paths and the methods each takes: another path
--     is a 404, another method a 405 with Allow (tests/e2e/test_edge_requests.py checks the
--     table against the proto's google.api.http bindings);
--   * a JSON endpoint refuses another content type, unparseable JSON, a body that is not
--     an object and a member of the wrong JSON type, in OpenAI's words with `param` and
--     `code`. The transcoder alone would accept "3" for an integer, and would answer in
--     protobuf's words without a param ("n: invalid value 3.5 for type TYPE_INT32").
-- On the way back (envoy_on_response):
--   * a server error carries its HTTP status and OpenAI body as the x-http-status and
--     x-openai-error metadata of a Trailers-Only gRPC error (server/errors.py); they are
--     applied here;
--   * a gRPC error without them (grpc-core's own, a bug) gets a generic message of its
--     class: its real cause goes to Envoy's log and the access log, never to the client;
--   * the transcoder's own 400s, handed over raw by local_reply_config, are translated;
--   * gRPC internals are removed, and the server's gRPC status is kept for the access log.
-- Success answers are never buffered here: they stream through, SSE included.
-- Verified behaviour this relies on: the shared reference envoy-transcoder-facts.md §5, §14.

-- Dynamic metadata namespace shared with envoy.yaml (local_reply_config, access log).
local NS = "imagegw"

local INTERNAL = {
  "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
  "grpc-encoding", "x-http-status", "x-openai-error", "x-imagegw-transcoder-error",
}

-- JSON types of GenerateImagesRequest's fields (proto/imagegw/v1/images.proto).
local GENERATION_FIELDS = {
  prompt = "string", model = "string", n = "integer", quality = "string",
  response_format = "string", size = "string", style = "string", user = "string",
  background = "string", moderation = "string", output_format = "string",
  output_compression = "integer", stream = "boolean", partial_images = "integer",
}

-- Every public path, the methods it takes, the query parameters it reads, and for JSON
-- endpoints the types of the body's members. Upload endpoints (multipart, or JSON edits)
-- stream through to the server, which reads and checks their bodies itself. Any other
-- query parameter is dropped here: the transcoder would make it a request field
-- (`?stream=true`, `?model=x` overriding the path), past every check of the body.
local ENDPOINTS = {
  {path = "^/v1/images/generations$", methods = {"POST"}, json = GENERATION_FIELDS},
  {path = "^/v1/images/edits$", methods = {"POST"}},
  {path = "^/v1/images/variations$", methods = {"POST"}},
  {path = "^/v1/images/files/[^/]+$", methods = {"GET"}, query = {expires = true, signature = true}},
  {path = "^/v1/models$", methods = {"GET"}},
  {path = "^/v1/models/[^/]+$", methods = {"GET"}},
}

-- Only for a gRPC status without our metadata (grpc-core's own errors, or a bug).
local GRPC_TO_HTTP = {
  ["1"] = 499, ["2"] = 500, ["3"] = 400, ["4"] = 504, ["5"] = 404, ["6"] = 409,
  ["7"] = 403, ["8"] = 503, ["9"] = 400, ["10"] = 409, ["11"] = 400, ["12"] = 501,
  ["13"] = 500, ["14"] = 503, ["15"] = 500, ["16"] = 401,
}

-- The generic answer of each class; the cause is logged, never sent.
local GENERIC = {
  [400] = {"The request could not be processed.", "invalid_request"},
  [401] = {"The request could not be authenticated.", "invalid_api_key"},
  [403] = {"The request is not allowed.", "permission_denied"},
  [404] = {"The requested resource was not found.", "not_found"},
  [409] = {"The request conflicts with another one; retry it.", "conflict"},
  [413] = {"Request too large.", "request_too_large"},
  [431] = {"Request headers too large.", "request_headers_too_large"},
  [499] = {"The request was cancelled.", "cancelled"},
  [500] = {"The server had an error while processing your request.", "internal_error"},
  [501] = {"The server does not implement this request.", "not_implemented"},
  [503] = {"The server is temporarily unable to handle the request; retry it shortly.", "service_unavailable"},
  [504] = {"The request timed out.", "timeout"},
}

-- Records a value in the stream's dynamic metadata (local_reply_config and the access log
-- read it in envoy.yaml). The wrapper is fetched each time: wrappers do not survive a yield.
local function record(handle, key, value)
  handle:streamInfo():dynamicMetadata():set(NS, key, value)
end

local function strip(map)
  if map == nil then return end
  for _, name in ipairs(INTERNAL) do map:remove(name) end
end

local function percent_decode(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- Whether `text` is UTF-8 (RFC 3629: no overlong forms, no surrogates, at most U+10FFFF).
local function is_utf8(text)
  if not text:find("[\128-\255]") then return true end
  local at, size = 1, #text
  while at <= size do
    local lead = text:byte(at)
    local length = 1
    if lead >= 0xF0 and lead <= 0xF4 then
      length = 4
    elseif lead >= 0xE0 and lead <= 0xEF then
      length = 3
    elseif lead >= 0xC2 and lead <= 0xDF then
      length = 2
    elseif lead >= 0x80 then
      return false
    end
    for i = 1, length - 1 do
      local byte = text:byte(at + i)
      if byte == nil or byte < 0x80 or byte > 0xBF then return false end
    end
    local second = text:byte(at + 1)
    if (lead == 0xE0 and second < 0xA0) or (lead == 0xED and second > 0x9F)
        or (lead == 0xF0 and second < 0x90) or (lead == 0xF4 and second > 0x8F) then
      return false
    end
    at = at + length
  end
  return true
end

-- The request's query string with only the parameters the endpoint reads, and whether
-- every part of the URL the server will read is UTF-8 once percent-decoded (protobuf
-- strings must be: the server could not even decode the request).
local function endpoint_query(endpoint, path, query)
  local kept = {}
  for pair in (query or ""):gmatch("[^&]+") do
    local name, value = pair:match("^([^=]*)=?(.*)$")
    if endpoint.query ~= nil and endpoint.query[percent_decode(name)] then
      if not is_utf8(percent_decode(value:gsub("%+", " "))) then return nil, false end
      kept[#kept + 1] = pair
    end
  end
  return table.concat(kept, "&"), is_utf8(percent_decode(path))
end

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

local function json_or_null(text)
  if text == nil then return "null" end
  return json_string(text)
end

local function openai_error(message, kind, param, code)
  return '{"error":{"message":' .. json_string(message) .. ',"type":"' .. kind .. '","param":'
    .. json_or_null(param) .. ',"code":' .. json_or_null(code) .. '}}'
end

-- Answers the request from here. local_reply_config passes the body on unchanged because
-- of the `reply` metadata.
local function reply(handle, status, body, extra_headers)
  record(handle, "reply", true)
  local headers = {[":status"] = tostring(status), ["content-type"] = "application/json", ["x-should-retry"] = "false"}
  for name, value in pairs(extra_headers or {}) do headers[name] = value end
  handle:respond(headers, body)
end

local function invalid_request(handle, message, param, code)
  reply(handle, 400, openai_error(message, "invalid_request_error", param, code))
end

---------------------------------------------------------------------------------------
-- A strict JSON scanner (RFC 8259). It checks the whole text and reports the JSON type
-- of each member of the root object; it builds no values. Its work is bounded so that a
-- hostile body cannot hold an Envoy worker: past MAX_DEPTH nesting levels, or past
-- MAX_STEPS tokens and escapes (a real request has a few dozen; a 32000-character prompt
-- written entirely in \u escapes has 32000), it stops (after about 30 ms) and leaves the
-- body to the transcoder, whose own refusals are translated below.

local MAX_DEPTH = 64
local MAX_STEPS = 40000
local OVER_BUDGET = {}
local steps = 0
local INT32_MAX = 2147483647

local function step()
  steps = steps + 1
  if steps > MAX_STEPS then error(OVER_BUDGET) end
end

local function skip_space(text, pos)
  return text:match("^[ \t\r\n]*()", pos)
end

-- Position after the string starting at `pos` (its opening quote), or nil.
local function scan_string(text, pos)
  local at = pos + 1
  while true do
    step()
    local stop = text:find('["\\%z\1-\31]', at)
    if stop == nil then return nil end
    local byte = text:byte(stop)
    if byte == 34 then return stop + 1 end -- the closing quote
    if byte ~= 92 then return nil end -- an unescaped control character
    local escape = text:sub(stop + 1, stop + 1)
    if escape == "u" then
      if not text:find("^%x%x%x%x", stop + 2) then return nil end
      at = stop + 6
    elseif escape ~= "" and ('"\\/bfnrt'):find(escape, 1, true) then
      at = stop + 2
    else
      return nil
    end
  end
end

-- Position after the number starting at `pos`, or nil.
local function scan_number(text, pos)
  local stop = text:match("^%-?0()", pos) or text:match("^%-?[1-9]%d*()", pos)
  if stop == nil then return nil end
  stop = text:match("^%.%d+()", stop) or stop
  return text:match("^[eE][%+%-]?%d+()", stop) or stop
end

local scan_value

local ESCAPED = {b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}

-- A member name (the text between its quotes, already checked) as the transcoder reads
-- it: `"\u006e"` is `n`. Field names are ASCII, so any other character becomes a NUL,
-- which names no field.
local function member_name(raw)
  if not raw:find("\\", 1, true) then return raw end
  local parts, at = {}, 1
  while true do
    local slash = raw:find("\\", at, true)
    if slash == nil then break end
    parts[#parts + 1] = raw:sub(at, slash - 1)
    local escape = raw:sub(slash + 1, slash + 1)
    if escape == "u" then
      local code = tonumber(raw:sub(slash + 2, slash + 5), 16)
      parts[#parts + 1] = code < 128 and string.char(code) or "\0"
      at = slash + 6
    else
      parts[#parts + 1] = ESCAPED[escape] or escape
      at = slash + 2
    end
  end
  parts[#parts + 1] = raw:sub(at)
  return table.concat(parts)
end

-- Position after the object or array starting at `pos`, or nil. For the root object,
-- `on_member(key, kind, first, last, member_first, after)` is called for each member:
-- its decoded name, its value's kind and extent, where the member starts, and the
-- position of the `,` or `}` after it.
local function scan_container(text, pos, depth, on_member)
  local object = text:sub(pos, pos) == "{"
  local close = object and "}" or "]"
  pos = skip_space(text, pos + 1)
  if text:sub(pos, pos) == close then return pos + 1 end
  while true do
    local key
    local member_first = pos
    if object then
      if text:sub(pos, pos) ~= '"' then return nil end
      local key_stop = scan_string(text, pos)
      if key_stop == nil then return nil end
      key = member_name(text:sub(pos + 1, key_stop - 2))
      pos = skip_space(text, key_stop)
      if text:sub(pos, pos) ~= ":" then return nil end
      pos = skip_space(text, pos + 1)
    end
    local stop, kind = scan_value(text, pos, depth)
    if stop == nil then return nil end
    local value_first = pos
    pos = skip_space(text, stop)
    local next_char = text:sub(pos, pos)
    if on_member ~= nil and object then on_member(key, kind, value_first, stop - 1, member_first, pos) end
    if next_char == close then return pos + 1 end
    if next_char ~= "," then return nil end
    pos = skip_space(text, pos + 1)
  end
end

-- Position after the value at `pos` and its kind (string, number, boolean, null, object,
-- array), or nil.
scan_value = function(text, pos, depth, on_member)
  step()
  local first = text:sub(pos, pos)
  if first == '"' then
    return scan_string(text, pos), "string"
  elseif first == "{" or first == "[" then
    if depth >= MAX_DEPTH then return nil end
    return scan_container(text, pos, depth + 1, on_member), first == "{" and "object" or "array"
  elseif text:find("^true", pos) or text:find("^false", pos) then
    return pos + (first == "t" and 4 or 5), "boolean"
  elseif text:find("^null", pos) then
    return pos + 4, "null"
  end
  return scan_number(text, pos), "number"
end

local DESCRIBED = {
  string = "a string", integer = "an integer", decimal = "a decimal number", boolean = "a boolean",
  object = "an object", array = "an array",
}

local PARSE_ERROR = "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
  .. "using your HTTP library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)"

-- The field a member name sets (its proto name), or nil. The transcoder also takes
-- lowerCamelCase names (responseFormat).
local function field_of(fields, key)
  if fields[key] ~= nil then return key end
  if key:find("%u") then
    local snake = key:gsub("%u", function(c) return "_" .. c:lower() end)
    if fields[snake] ~= nil then return snake end
  end
  return nil
end

-- The problem with one member of the root object (message, param, code), or nil.
local function member_problem(fields, text, key, got, first, last)
  local field = field_of(fields, key)
  if field == nil or got == "null" then return nil end -- unknown members and null are ignored
  local expected = fields[field]
  if got == "number" then
    local literal = text:sub(first, last)
    local value = tonumber(literal)
    got = (value == math.floor(value)) and "integer" or "decimal"
    if got == "integer" and expected == "integer" and (value > INT32_MAX or value < -INT32_MAX - 1) then
      local above = value > 0
      return string.format("Invalid '%s': integer %s. Expected a value %s %d, but got %s instead.", key,
          above and "above maximum value" or "below minimum value", above and "<=" or ">=",
          above and INT32_MAX or -INT32_MAX - 1, literal),
        key, above and "integer_above_max_value" or "integer_below_min_value"
    end
  end
  if got == expected then return nil end
  return string.format("Invalid type for '%s': expected %s, but got %s instead.", key, DESCRIBED[expected],
    DESCRIBED[got]), key, "invalid_type"
end

-- `text` without the members in `ranges` ({first, after} pairs, in order), each replaced
-- by as many spaces: the JSON stays valid and as long.
local function blank(text, ranges)
  local parts, at = {}, 1
  for _, range in ipairs(ranges) do
    parts[#parts + 1] = text:sub(at, range[1] - 1)
    parts[#parts + 1] = string.rep(" ", range[2] - range[1] + 1)
    at = range[2] + 1
  end
  parts[#parts + 1] = text:sub(at)
  return table.concat(parts)
end

-- nil when `text` is a JSON object whose members named in `fields` have their JSON types;
-- otherwise OpenAI's error (message, param, code) for the first problem. The whole text
-- is checked first: a body that is not JSON is reported as such. A field set more than
-- once (`"n"` twice, or `response_format` and `responseFormat`) takes its last value, as
-- JSON parsers commonly do; the transcoder would refuse it for an optional field, so the
-- fourth result is then the text with the earlier members blanked out (every one of them
-- was type-checked).
local function check_json(text, fields)
  local problem
  local last_member, repeated = {}, {}
  local function on_member(key, kind, first, last, member_first, after)
    if problem == nil then
      local message, param, code = member_problem(fields, text, key, kind, first, last)
      if message ~= nil then problem = {message, param, code} end
    end
    local field = field_of(fields, key)
    if field ~= nil then
      -- An earlier member is always followed by a comma: blank it with its comma.
      if last_member[field] ~= nil then repeated[#repeated + 1] = last_member[field] end
      last_member[field] = {member_first, after}
    end
  end
  steps = 0
  local scanned, stop, kind = pcall(scan_value, text, skip_space(text, 1), 0, on_member)
  if not scanned then
    if stop == OVER_BUDGET then return nil end
    error(stop)
  end
  if stop == nil or skip_space(text, stop) <= #text then
    return PARSE_ERROR, nil, "invalid_json"
  end
  if kind ~= "object" then
    local got = kind == "number" and "a number" or (kind == "null" and "null" or DESCRIBED[kind])
    return "Invalid type for the request body: expected an object, but got " .. got .. " instead.", nil, "invalid_type"
  end
  if problem ~= nil then return problem[1], problem[2], problem[3] end
  if #repeated > 0 then
    table.sort(repeated, function(a, b) return a[1] < b[1] end)
    return nil, nil, nil, blank(text, repeated)
  end
  return nil
end

---------------------------------------------------------------------------------------

local function find_endpoint(path)
  for _, endpoint in ipairs(ENDPOINTS) do
    if path:find(endpoint.path) then return endpoint end
  end
  return nil
end

local function allows(endpoint, method)
  for _, allowed in ipairs(endpoint.methods) do
    if allowed == method then return true end
  end
  return false
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  -- Routes match gRPC paths, so a gRPC client could otherwise call any service through
  -- the public port, AdminService included. gRPC callers use the gRPC port. Only what
  -- Envoy itself takes for gRPC (and answers in gRPC) is: `application/grpc-web` and the
  -- like are HTTP requests with a content type, answered in OpenAI's words below.
  local grpc_type = content_type:match("^application/grpc$") or content_type:match("^application/grpc%+")
  if grpc_type ~= nil then
    -- Envoy answers a gRPC request's local reply in gRPC (UNIMPLEMENTED with this message),
    -- which the response side leaves alone.
    record(handle, "grpc_client", true)
    reply(handle, 404, "gRPC is not served on this port; call the gRPC port.")
    return
  end
  local method = headers:get(":method")
  local full_path = headers:get(":path") or ""
  local path = full_path:match("^[^?]*")
  local endpoint = find_endpoint(path)
  if endpoint == nil then
    reply(handle, 404, openai_error("Invalid URL (" .. method .. " " .. path .. ").",
      "invalid_request_error", nil, "not_found"))
    return
  end
  if not allows(endpoint, method) then
    reply(handle, 405, openai_error("Invalid method for URL (" .. method .. " " .. path .. ").",
      "invalid_request_error", nil, "method_not_allowed"), {allow = table.concat(endpoint.methods, ", ")})
    return
  end
  local query, utf8 = endpoint_query(endpoint, path, full_path:match("%?(.*)$"))
  if not utf8 then
    invalid_request(handle, "Invalid URL (" .. method .. " " .. path .. "): the path and query must be UTF-8 "
      .. "text once percent-decoded.", nil, "invalid_url")
    return
  end
  local sent_on = query == "" and path or (path .. "?" .. query)
  if sent_on ~= full_path then headers:replace(":path", sent_on) end
  -- Kept for the response side, which cannot read request headers: a warning about an
  -- error without our metadata names the request.
  record(handle, "request_id", headers:get("x-request-id"))
  if endpoint.json == nil then return end
  local media_type = content_type:match("^%s*([^;%s]*)"):lower()
  if media_type ~= "" and media_type ~= "application/json" then
    invalid_request(handle, "Invalid Content-Type header (" .. content_type .. "): " .. path
      .. " takes a JSON body, sent as 'Content-Type: application/json'.", nil, "invalid_content_type")
    return
  end
  -- The buffer filter before this one has the whole body already (or has refused it).
  local body = handle:body()
  if body == nil or body:length() == 0 then return end -- an empty body is the empty object
  local message, param, code, rewritten = check_json(body:getBytes(0, body:length()), endpoint.json)
  if message ~= nil then
    invalid_request(handle, message, param, code)
  elseif rewritten ~= nil then
    body:setBytes(rewritten)
  end
end

---------------------------------------------------------------------------------------

local PROTO_TYPES = {
  INT32 = "integer", INT64 = "integer", UINT32 = "integer", UINT64 = "integer", SINT32 = "integer",
  SINT64 = "integer", FIXED32 = "integer", FIXED64 = "integer", SFIXED32 = "integer", SFIXED64 = "integer",
  BOOL = "boolean", STRING = "string", BYTES = "string",
}

-- The transcoder's text in OpenAI's words. It reports a field it could not convert as
-- `name: invalid value VALUE for type TYPE_X` (a query parameter of a GET, for example);
-- anything else it refuses is a body it could not read as JSON.
local function translate_transcoder_error(text)
  local field, value, proto_type = text:match("^([%w_%.]+): invalid value (.*) for type TYPE_(%u+%d*)$")
  local expected = PROTO_TYPES[proto_type or ""]
  if expected == nil then
    return openai_error(PARSE_ERROR, "invalid_request_error", nil, "invalid_json")
  end
  -- A query parameter's value comes quoted: judge what it holds.
  value = value:match('^"(.*)"$') or value
  local got = "string"
  if value == "true" or value == "false" then
    got = "boolean"
  elseif value:find("^%-?%d+$") then
    got = "integer"
  elseif value:find("^%-?%d[%d%.eE%+%-]*$") then
    got = "decimal"
  end
  if got == expected then -- a number out of the field's range
    return openai_error("Invalid '" .. field .. "': " .. value .. " is out of range.", "invalid_request_error",
      field, "integer_out_of_range")
  end
  return openai_error(string.format("Invalid type for '%s': expected %s, but got %s instead.", field,
    DESCRIBED[expected], DESCRIBED[got]), "invalid_request_error", field, "invalid_type")
end

-- A gRPC error without our metadata: which HTTP status it is. grpc-core refuses an
-- oversized message or metadata with RESOURCE_EXHAUSTED; that is the request's size, not a
-- rate limit (our rate limits always carry x-openai-error).
local function classify(grpc_status, cause)
  if grpc_status == "8" then
    if cause:find("metadata") then return 431 end
    if cause:find("message larger than max") then return 413 end
  end
  return GRPC_TO_HTTP[grpc_status] or 500
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local ours = handle:streamInfo():dynamicMetadata():get(NS)
  if ours ~= nil and ours.grpc_client then return end
  local grpc_status = headers:get("grpc-status")
  if headers:get("x-imagegw-transcoder-error") ~= nil then
    -- A local reply: small and complete.
    local body = handle:body(true)
    headers = handle:headers()
    local text = body:getBytes(0, body:length())
    strip(headers)
    headers:replace("content-type", "application/json")
    headers:replace("x-should-retry", "false")
    body:setBytes(translate_transcoder_error(text))
    return
  end
  if headers:get("x-http-status") == nil and (grpc_status == nil or grpc_status == "0") then
    -- Success (or one of Envoy's own local replies): never buffer, just hide internals.
    strip(headers)
    if grpc_status == "0" then
      record(handle, "grpc_status", 0)
    elseif headers:get(":status") == "200" then
      -- A streamed answer: its gRPC status comes in trailers, after every chunk has gone on.
      for _ in handle:bodyChunks() do end
      local trailers = handle:trailers()
      if trailers ~= nil then
        local status = trailers:get("grpc-status")
        if status ~= nil then record(handle, "grpc_status", tonumber(status)) end
        strip(trailers)
      end
    end
    return
  end
  -- body() and trailers() may yield; wrappers fetched before a yield are dead after it.
  handle:body(true)
  headers = handle:headers()
  local body = handle:body(true)
  local trailers = handle:trailers()
  local status, error_body = headers:get("x-http-status"), headers:get("x-openai-error")
  if status == nil and trailers ~= nil then
    status, error_body = trailers:get("x-http-status"), trailers:get("x-openai-error")
    grpc_status = grpc_status or trailers:get("grpc-status")
  end
  if grpc_status ~= nil then record(handle, "grpc_status", tonumber(grpc_status)) end
  if error_body == nil then
    -- Not from our error table: a generic answer of its class; the cause stays here.
    local cause = percent_decode(headers:get("grpc-message") or (trailers and trailers:get("grpc-message")) or "")
    local code = tonumber(status) or classify(grpc_status or "2", cause)
    status = tostring(code)
    local generic = GENERIC[code] or GENERIC[code < 500 and 400 or 500]
    error_body = openai_error(generic[1], code < 500 and "invalid_request_error" or "server_error", nil, generic[2])
    record(handle, "cause", "grpc-status " .. tostring(grpc_status) .. ": " .. cause)
    handle:logWarn("gRPC status " .. tostring(grpc_status) .. " without x-openai-error, answered " .. status
      .. " (request " .. tostring(ours and ours.request_id) .. "): " .. cause)
    headers:replace("x-should-retry", code == 503 and "true" or "false")
  end
  strip(headers)
  strip(trailers)
  headers:replace(":status", status)
  headers:replace("content-type", "application/json")
  -- The transcoder always hands a (possibly empty) body buffer to an error response.
  if body ~= nil then body:setBytes(error_body) end
end
