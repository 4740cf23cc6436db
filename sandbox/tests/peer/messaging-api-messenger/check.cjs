// Drives graph-sandbox with the npm `messaging-api-messenger` client, changed only in its base
// URL (`origin`): a one-time-token send, a refused reuse, and a batch of token sends. It signs
// calls with appsecret_proof, as the library does when given the app secret.
//
// Environment: SANDBOX_URL, PAGE_TOKEN, APP_SECRET, OTN_TOKENS (comma-separated; the first is
// sent alone, the rest in one batch), EXPECTED_PSID (the first token's user).
const assert = require('node:assert/strict');
const { MessengerClient, MessengerBatch } = require('messaging-api-messenger');

async function main() {
  const client = new MessengerClient({
    accessToken: process.env.PAGE_TOKEN,
    appSecret: process.env.APP_SECRET,
    origin: process.env.SANDBOX_URL,
    version: '24.0',
  });
  const [single, ...batchTokens] = process.env.OTN_TOKENS.split(',');

  const sent = await client.sendMessage(
    { oneTimeNotifToken: single },
    { text: 'Tickets are on sale' },
  );
  assert.equal(sent.recipientId, process.env.EXPECTED_PSID);
  assert.match(sent.messageId, /^m_/);

  await assert.rejects(
    client.sendMessage({ oneTimeNotifToken: single }, { text: 'again' }),
    (error) => /already used/.test(String(error.message)),
  );

  const results = await client.sendBatch(
    batchTokens.map((token) =>
      MessengerBatch.sendMessage({ oneTimeNotifToken: token }, { text: 'Batch hello' }),
    ),
  );
  assert.equal(results.length, batchTokens.length);
  for (const result of results) {
    assert.equal(result.code, 200, JSON.stringify(result));
    assert.match(result.body.messageId, /^m_/);
  }
  console.log(JSON.stringify({ single: sent.messageId, batch: results.length }));
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : error);
  process.exit(1);
});
