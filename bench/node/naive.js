'use strict';
// The buffering baseline: express + body-parser read the whole body, parse it
// as one JSON array, and only then is each user stored, one INSERT per user,
// in one transaction. Memory grows with the body; V8's string limit ends it.
const express = require('express');
const bodyParser = require('body-parser');
const common = require('./common');

const app = express();
app.use(bodyParser.json({ limit: '4gb' }));

app.post('/users', async (req, res) => {
  if (!Array.isArray(req.body)) {
    res.status(400).json({ error: 'the body must be a JSON array of users' });
    return;
  }
  const client = await common.pool.connect();
  try {
    await client.query('BEGIN');
    for (const record of req.body) await common.insertUser(client, record);
    await client.query('COMMIT');
    res.json({ inserted: req.body.length });
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    console.error(err);
    res.status(500).json({ error: err.message });
  } finally {
    client.release();
  }
});

common.start('naive', app).catch((err) => { console.error(err); process.exit(1); });
