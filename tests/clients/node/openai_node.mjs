// The official openai-node SDK, as an application uses it: node openai_node.mjs <baseURL> <key> <request JSON> <out file>
// Prints {"ok": true, ...} with the response's status and headers, or the SDK's error as it raises it.
import { writeFile } from "node:fs/promises";
import OpenAI from "openai";

const [baseURL, apiKey, request, out] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
try {
  const response = await client.audio.speech.create(JSON.parse(request));
  const audio = Buffer.from(await response.arrayBuffer());
  await writeFile(out, audio);
  console.log(JSON.stringify({
    ok: true,
    status: response.status,
    contentType: response.headers.get("content-type"),
    charged: response.headers.get("x-credits-charged"),
    bytes: audio.length,
  }));
} catch (error) {
  if (!(error instanceof OpenAI.APIError)) throw error;
  console.log(JSON.stringify({
    ok: false,
    name: error.constructor.name,
    status: error.status,
    code: error.code,
    param: error.param,
    type: error.type,
    message: error.error?.message,
  }));
}
