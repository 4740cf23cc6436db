// The other peer of the send-engine benchmark: the npm `messaging-api-messenger` client sending
// one-time-token messages one per request (`sendMessage`, i.e. POST /me/messages), `IN_FLIGHT`
// requests at a time, no persistence. Node's global agent keeps connections alive, so this is as
// many connections as requests in flight. Prints one JSON line.
//
// Environment: SANDBOX_URL, PAGE_TOKEN, APP_SECRET, TOKENS_FILE (one token per line), IN_FLIGHT.
const fs = require('node:fs');
const { MessengerClient } = require('messaging-api-messenger');

async function main() {
  const client = new MessengerClient({
    accessToken: process.env.PAGE_TOKEN,
    appSecret: process.env.APP_SECRET,
    origin: process.env.SANDBOX_URL,
    version: '24.0',
  });
  const tokens = fs.readFileSync(process.env.TOKENS_FILE, 'utf8').trim().split('\n');
  const inFlight = Number(process.env.IN_FLIGHT || 64);
  let next = 0;
  let accepted = 0;
  let refused = 0;
  let firstError = null;
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  async function worker() {
    while (next < tokens.length) {
      const token = tokens[next];
      next += 1;
      try {
        await client.sendMessage({ oneTimeNotifToken: token }, { text: 'Tickets are on sale' });
        accepted += 1;
      } catch (error) {
        refused += 1;
        if (firstError === null) firstError = String(error && error.message);
      }
    }
  }
  await Promise.all(Array.from({ length: inFlight }, worker));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  console.log(
    JSON.stringify({
      in_flight: inFlight,
      accepted,
      refused,
      first_error: firstError,
      seconds,
      per_second: accepted / seconds,
      cpu_seconds: (cpu.user + cpu.system) / 1e6,
      max_rss_mib: process.resourceUsage().maxRSS / 1024,
    }),
  );
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : error);
  process.exit(1);
});
