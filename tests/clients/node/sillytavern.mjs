// SillyTavern's "OpenAI Compatible" TTS, as its server sends it (src/endpoints/openai.js,
// custom.post('/generate-voice')): Node's fetch, these two headers, these five fields with these defaults.
// node sillytavern.mjs <speech URL> <key> <fields JSON> <out file>
import { writeFile } from "node:fs/promises";

const [providerEndpoint, key, fields, out] = process.argv.slice(2);
const { input, response_format, voice, speed, model } = JSON.parse(fields);
const result = await fetch(providerEndpoint, {
  method: "POST",
  headers: {
    "Content-Type": "application/json",
    Authorization: `Bearer ${key ?? ""}`,
  },
  body: JSON.stringify({
    input: input ?? "",
    response_format: response_format ?? "mp3",
    voice: voice ?? "alloy",
    speed: speed ?? 1,
    model: model ?? "tts-1",
  }),
});
const body = Buffer.from(await result.arrayBuffer());
if (result.ok) await writeFile(out, body);
console.log(JSON.stringify({ ok: result.ok, status: result.status, contentType: result.headers.get("content-type"), text: result.ok ? null : body.toString() }));
