// Runs one scenario of the official `openai` JavaScript SDK against a running gateway and
// prints its outcome as one JSON object on stdout. tests/js_harness.py starts it.
//
//   node run.mjs < {"baseURL": ..., "apiKey": ..., "input": {...}, "file": "scenarios/x.mjs" | "source": "..."}
//
// A scenario is an ES module whose default export is `async (ctx) => result`; `result` must
// be JSON-serialisable. ctx holds:
//   client(options)   a new OpenAI client on the gateway (no retries unless options say so)
//   input             the JSON the test passed in
//   attempt(fn)       awaits fn(); {ok: true, value} or {ok: false, error: describeError(e)}
//   describeError(e)  the SDK error as data: its class chain, status, type, code, param, ...
//   OpenAI, toFile, fs  the SDK and Node's fs, for scenarios given inline as `source`
// The outcome is {"ok": true, "result": ...}, or {"ok": false, "error": ...} when the
// scenario throws.

import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import OpenAI, { toFile } from "openai";

const here = path.dirname(fileURLToPath(import.meta.url));

function classChain(error) {
  const names = [];
  for (let proto = Object.getPrototypeOf(error); proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    names.push(proto.constructor.name);
  }
  return names;
}

export function describeError(error) {
  const described = { classes: classChain(error), message: error.message };
  if (error instanceof OpenAI.APIError) {
    Object.assign(described, {
      status: error.status ?? null,
      type: error.type ?? null,
      code: error.code ?? null,
      param: error.param ?? null,
      error: error.error ?? null,
      requestID: error.requestID ?? null,
      headers: error.headers ? Object.fromEntries(error.headers.entries()) : {},
    });
  }
  return described;
}

async function attempt(fn) {
  try {
    return { ok: true, value: await fn() };
  } catch (error) {
    return { ok: false, error: describeError(error) };
  }
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const module = request.source !== undefined
    ? await import("data:text/javascript;base64," + Buffer.from(request.source).toString("base64"))
    : await import(pathToFileURL(path.resolve(here, request.file)).href);
  const ctx = {
    client: (options = {}) => new OpenAI({ apiKey: request.apiKey, baseURL: request.baseURL, maxRetries: 0, ...options }),
    input: request.input ?? {},
    attempt,
    describeError,
    OpenAI,
    toFile,
    fs,
  };
  let outcome;
  try {
    outcome = { ok: true, result: (await module.default(ctx)) ?? null };
  } catch (error) {
    outcome = { ok: false, error: describeError(error) };
  }
  process.stdout.write(JSON.stringify(outcome) + "\n");
}

await main();
