-- Makes every response look like OpenAI's, whatever happened behind Envoy.
--
-- The server chooses the HTTP status and the OpenAI error body itself (server/errors.py)
-- and sends them as the x-http-status and x-openai-error metadata of a Trailers-Only
-- gRPC error; this filter applies them and removes gRPC internals. It holds no mapping
-- of its own except a fallback for errors that did not come from our error table.
-- Verified behaviour it relies on: ../shared/reference/envoy-transcoder-facts.md §5b.

local INTERNAL = {
  "grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
  "grpc-encoding", "x-http-status", "x-openai-error",
}

-- Only for a gRPC status without our metadata (a bug, or grpc-core's own errors).
local GRPC_TO_HTTP = {
  ["1"] = 499, ["2"] = 500, ["3"] = 400, ["4"] = 504, ["5"] = 404, ["6"] = 409,
  ["7"] = 403, ["8"] = 429, ["9"] = 400, ["10"] = 409, ["11"] = 400, ["12"] = 501,
  ["13"] = 500, ["14"] = 503, ["15"] = 500, ["16"] = 401,
}

local function strip(map)
  if map == nil then return end
  for _, name in ipairs(INTERNAL) do map:remove(name) end
end

local function percent_decode(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
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

function envoy_on_request(handle)
  -- Routes match gRPC paths, so a gRPC client could otherwise call any service through
  -- the public port, AdminService included. gRPC callers use the gRPC port.
  local content_type = handle:headers():get("content-type") or ""
  if content_type:sub(1, 16) == "application/grpc" then
    handle:respond(
      {[":status"] = "404", ["content-type"] = "application/json"},
      '{"error":{"message":"gRPC is not served on this port.","type":"invalid_request_error","param":null,"code":"not_found"}}')
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local grpc_status = headers:get("grpc-status")
  if headers:get("x-http-status") == nil and (grpc_status == nil or grpc_status == "0") then
    -- Success (or one of Envoy's own local replies): never buffer, just hide internals.
    strip(headers)
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
  end
  if status == nil then
    status = tostring(GRPC_TO_HTTP[grpc_status] or 500)
  end
  if error_body == nil then
    local message = percent_decode(headers:get("grpc-message") or "The server had an error while processing your request.")
    local kind = "server_error"
    if tonumber(status) < 500 then kind = "invalid_request_error" end
    error_body = '{"error":{"message":' .. json_string(message) .. ',"type":"' .. kind .. '","param":null,"code":null}}'
  end
  strip(headers)
  strip(trailers)
  headers:replace(":status", status)
  headers:replace("content-type", "application/json")
  -- The transcoder always hands a (possibly empty) body buffer to an error response.
  if body ~= nil then body:setBytes(error_body) end
end
