// The peer of the send-engine benchmark: what a user would otherwise write, the npm
// `messaging-api-messenger` client sending one-time-token messages with `sendBatch` (50 per
// request) in a plain loop, no persistence, `LOOPS` loops side by side. Prints one JSON line
// (with the process's CPU seconds while sending and its peak RSS).
//
// Environment: SANDBOX_URL, PAGE_TOKEN, APP_SECRET, TOKENS_FILE (one token per line), LOOPS.
const fs = require('node:fs');
const { MessengerClient, MessengerBatch } = require('messaging-api-messenger');

async function main() {
  const client = new MessengerClient({
    accessToken: process.env.PAGE_TOKEN,
    appSecret: process.env.APP_SECRET,
    origin: process.env.SANDBOX_URL,
    version: '24.0',
  });
  const tokens = fs.readFileSync(process.env.TOKENS_FILE, 'utf8').trim().split('\n');
  const loops = Number(process.env.LOOPS || 1);
  let next = 0;
  let accepted = 0;
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  async function loop() {
    while (next < tokens.length) {
      const chunk = tokens.slice(next, next + 50);
      next += 50;
      const results = await client.sendBatch(
        chunk.map((token) =>
          MessengerBatch.sendMessage({ oneTimeNotifToken: token }, { text: 'Tickets are on sale' }),
        ),
      );
      accepted += results.filter((r) => r && r.code === 200).length;
    }
  }
  await Promise.all(Array.from({ length: loops }, loop));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  console.log(
    JSON.stringify({
      loops,
      accepted,
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
