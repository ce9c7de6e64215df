#!/usr/bin/env node
// A Node.js client of voicegate's gRPC API: embeds audio files and verifies two of them.
//
// It uses the official @grpc/grpc-js runtime and loads proto/ at run time with
// @grpc/proto-loader, so there is no generated code to keep in sync.
//
//   node client.js [--server HOST:PORT] [--model NAME] [--json] FILE [FILE]
//
// One file: Embed it. Two files: Embed each, then Verify the second (probe) against the
// first (reference). Exit status: 0 on success, 1 when an RPC fails (its status code and
// message go to stderr), 2 on a usage error.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const USAGE = `usage: node client.js [options] FILE [FILE]

Embeds each FILE (WAV, FLAC, OGG or MP3; sent as is, the server decodes it) and, given two,
verifies whether they hold the same speaker.

options:
  --server HOST:PORT   voicegate front server (default: $VOICEGATE_SERVER or localhost:50051)
  --model NAME         encoder for Embed (default: the server's default encoder)
  --deadline-ms N      deadline of each call in milliseconds (default 60000)
  --tls                use TLS (system roots, or --ca)
  --ca FILE            PEM root certificate(s) for --tls
  --proto-dir DIR      where voicegate/v1/*.proto live (default: ../../proto from here)
  --json               print one JSON document instead of text
  --help               show this help`;

function parseArgs(argv) {
  const options = {
    server: process.env.VOICEGATE_SERVER || 'localhost:50051',
    model: '',
    deadlineMs: 60000,
    tls: false,
    ca: null,
    protoDir: process.env.VOICEGATE_PROTO_DIR || path.resolve(__dirname, '..', '..', 'proto'),
    json: false,
    files: [],
  };
  const valued = {
    '--server': 'server',
    '--model': 'model',
    '--deadline-ms': 'deadlineMs',
    '--ca': 'ca',
    '--proto-dir': 'protoDir',
  };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--help' || arg === '-h') {
      console.log(USAGE);
      process.exit(0);
    } else if (arg === '--json') {
      options.json = true;
    } else if (arg === '--tls') {
      options.tls = true;
    } else if (arg in valued) {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      options[valued[arg]] = argv[(i += 1)];
    } else if (arg.startsWith('--')) {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      options.files.push(arg);
    }
  }
  options.deadlineMs = Number(options.deadlineMs);
  if (!Number.isFinite(options.deadlineMs) || options.deadlineMs <= 0) {
    throw new UsageError('--deadline-ms must be a positive number');
  }
  if (options.files.length < 1 || options.files.length > 2) {
    throw new UsageError('give one file to embed, or two to embed and verify');
  }
  return options;
}

class UsageError extends Error {}

/** The SpeakerService client constructor, from the .proto files. */
function loadSpeakerService(protoDir) {
  const definition = protoLoader.loadSync('voicegate/v1/speaker.proto', {
    includeDirs: [protoDir],
    keepCase: false, // fields in lowerCamelCase, as in JSON: sampleRateHz, speechSeconds
    longs: String,
    enums: String, // enum values by name: 'SAMPLE_FORMAT_LINEAR16'
    defaults: true, // unset fields read as their zero value
    oneofs: true, // `audio.source` names the field that is set
  });
  return grpc.loadPackageDefinition(definition).voicegate.v1.SpeakerService;
}

function credentials(options) {
  if (!options.tls) return grpc.credentials.createInsecure();
  const ca = options.ca ? fs.readFileSync(options.ca) : null;
  return grpc.credentials.createSsl(ca);
}

/** One unary call as a promise, with a deadline. */
function call(client, method, request, deadlineMs) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineMs);
    client[method](request, { deadline }, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

/** Whole files go as `Audio.content`; the server sniffs the container from the bytes. */
function audioOf(file) {
  return { content: fs.readFileSync(file) };
}

function norm(vector) {
  return Math.sqrt(vector.reduce((sum, value) => sum + value * value, 0));
}

async function run(options) {
  const SpeakerService = loadSpeakerService(options.protoDir);
  const client = new SpeakerService(options.server, credentials(options));
  try {
    const embeddings = [];
    for (const file of options.files) {
      const reply = await call(
        client,
        'Embed',
        { audio: audioOf(file), model: options.model },
        options.deadlineMs,
      );
      embeddings.push({
        file,
        model: reply.model,
        speechSeconds: reply.speechSeconds,
        partialCount: reply.partialCount,
        dimensions: reply.embedding.length,
        norm: norm(reply.embedding),
        embedding: reply.embedding,
      });
    }
    let verification = null;
    if (options.files.length === 2) {
      const reply = await call(
        client,
        'Verify',
        { reference: audioOf(options.files[0]), probe: audioOf(options.files[1]) },
        options.deadlineMs,
      );
      verification = {
        reference: options.files[0],
        probe: options.files[1],
        score: reply.score,
        sameSpeaker: reply.sameSpeaker,
        threshold: reply.threshold,
        scores: Object.fromEntries(reply.scores.map((s) => [s.model, s.score])),
      };
    }
    return { server: options.server, embeddings, verification };
  } finally {
    client.close();
  }
}

function printText(result) {
  for (const e of result.embeddings) {
    console.log(
      `${e.file}: ${e.dimensions}-d embedding (norm ${e.norm.toFixed(4)}) from ` +
        `${e.speechSeconds.toFixed(2)} s of speech, ${e.partialCount} partials, model ${e.model}`,
    );
  }
  const v = result.verification;
  if (v) {
    const verdict = v.sameSpeaker ? 'same speaker' : 'different speakers';
    const scores = Object.entries(v.scores)
      .map(([name, score]) => `${name} ${score.toFixed(4)}`)
      .join(', ');
    console.log(
      `${verdict}: score ${v.score.toFixed(4)} (threshold ${v.threshold.toFixed(4)}; ${scores})`,
    );
  }
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`voicegate client: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  try {
    const result = await run(options);
    if (options.json) console.log(JSON.stringify(result));
    else printText(result);
    return 0;
  } catch (error) {
    if (typeof error.code === 'number' && error.code in grpc.status) {
      // gRPC status names as in every other language: INVALID_ARGUMENT, UNAVAILABLE, ...
      console.error(`voicegate: ${grpc.status[error.code]}: ${error.details}`);
      return 1;
    }
    console.error(`voicegate client: ${error.message}`);
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
