// Runs the published npm package `syrpc` (unmodified) as a peer of rylm's interop tests.
//
//   node peer.js client APP TYPE DATA_JSON   -> prints {"result": ...} or {"exception": ...}
//   node peer.js server APP COUNT            -> prints "ready", serves COUNT requests
//                                               (echo, fail), prints {"served": COUNT}
//
// The package always dials port 5672 of its host; the harness points amqplib at the test
// broker (RYLM_AMQP_URL) instead, with TCP_NODELAY so that small frames are not delayed.
'use strict';

const amqplib = require('amqplib');
const brokerUrl = process.env.RYLM_AMQP_URL;
if (!brokerUrl) {
  console.error('RYLM_AMQP_URL is not set');
  process.exit(2);
}
const originalConnect = amqplib.connect;
amqplib.connect = function (_url, options) {
  return originalConnect.call(amqplib, brokerUrl, Object.assign({ noDelay: true }, options || {}));
};

const syrpc = require('syrpc');

const [mode, app, third, fourth] = process.argv.slice(2);
const settings = { app_name: app, amq_host: 'unused', timeout: 10000 };

function finish(object, code) {
  process.stdout.write(JSON.stringify(object) + '\n', () => process.exit(code));
}

// Never outlive the test that started us.
setTimeout(() => finish({ error: 'harness deadline passed' }, 3), 30000).unref();

if (mode === 'client') {
  const client = new syrpc.SyRPCClient(settings);
  client
    .init()
    .then(() => client.getResult(client.putRequest(third, JSON.parse(fourth))))
    .then(
      (result) => finish({ result: result.data }, 0),
      (error) => finish({ exception: error instanceof Error ? error.message : error }, 0),
    );
} else if (mode === 'server') {
  const count = parseInt(third, 10);
  const server = new syrpc.SyRPCServer(settings);
  let served = 0;
  const serveOne = () =>
    server.getRequest().then((request) => {
      if (request.type === 'echo') {
        server.putResult(request.result_id, request.data);
      } else if (request.type === 'fail') {
        server.putResult(request.result_id, { exception: 'failed on purpose: ' + JSON.stringify(request.data) });
      } else {
        server.putResult(request.result_id, { exception: 'unknown type ' + request.type });
      }
      served += 1;
      if (served >= count) {
        // putResult does not wait for its publish: give it a moment to reach the broker.
        setTimeout(() => finish({ served: served }, 0), 500);
        return undefined;
      }
      return serveOne();
    });
  server
    .init()
    .then(() => {
      process.stdout.write('ready\n');
      return serveOne();
    })
    .catch((error) => finish({ error: String(error) }, 2));
} else {
  console.error('usage: peer.js client APP TYPE DATA_JSON | server APP COUNT');
  process.exit(2);
}
