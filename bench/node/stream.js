'use strict';
// The streaming version of the write-up: the request is piped through split2,
// each line parsed on its own, and the line stream is paused while a record's
// image file and its row (one INSERT) are written, then resumed. One
// transaction per request.
const express = require('express');
const split2 = require('split2');
const common = require('./common');

const app = express();

app.post('/users', async (req, res) => {
  const client = await common.pool.connect();
  let inserted = 0;
  let writing = Promise.resolve();
  let done = false;

  const finish = async (err) => {
    if (done) return;
    done = true;
    if (err) {
      req.unpipe(lines);
      lines.destroy();
      await writing.catch(() => {}); // the INSERT in flight ends before the ROLLBACK
      await client.query('ROLLBACK').catch(() => {});
      client.release();
      console.error(err);
      res.set('Connection', 'close').status(err instanceof SyntaxError ? 400 : 500).json({ error: err.message });
      return;
    }
    try {
      await client.query('COMMIT');
      res.json({ inserted });
    } catch (commitErr) {
      res.status(500).json({ error: commitErr.message });
    } finally {
      client.release();
    }
  };

  try {
    await client.query('BEGIN');
  } catch (err) {
    client.release();
    res.status(500).json({ error: err.message });
    return;
  }
  const lines = req.pipe(split2(common.parseLine));
  lines.on('data', (record) => {
    lines.pause(); // no next line until this record is stored
    writing = common.insertUser(client, record);
    writing.then(() => { inserted += 1; lines.resume(); }, finish);
  });
  lines.on('end', () => finish(null));
  lines.on('error', finish); // a line that is not JSON
  req.on('error', finish);
});

common.start('stream', app).catch((err) => { console.error(err); process.exit(1); });
