'use strict';
// What the three comparison servers share: configuration from the
// environment, the PostgreSQL pool and table, and writing one image file.
//
//   PORT         TCP port to listen on (127.0.0.1), default 8000
//   DATABASE_URL PostgreSQL connection string
//   IMAGES_DIR   directory for the decoded images, created when missing
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const { Pool } = require('pg');

const port = Number(process.env.PORT || 8000);
const imagesDir = path.resolve(process.env.IMAGES_DIR || 'images');
const pool = new Pool({ connectionString: process.env.DATABASE_URL, max: 4 });

// The table of the write-up: the user's name and email, and where the image went.
const CREATE_TABLE = `CREATE TABLE IF NOT EXISTS users (
  user_id serial PRIMARY KEY,
  name    text,
  email   text,
  image   text
)`;

// Records carry the name as "user" (the write-up) or "name".
function nameOf(record) {
  return record.user !== undefined ? record.user : record.name;
}

// Decodes one base64 image into a new file named by 128 random bits and
// returns its absolute path (null when the record has no image).
async function saveImage(base64) {
  if (typeof base64 !== 'string' || base64.length === 0) return null;
  const file = path.join(imagesDir, crypto.randomBytes(16).toString('hex') + '.img');
  await fs.promises.writeFile(file, Buffer.from(base64, 'base64'), { flag: 'wx' });
  return file;
}

// One record: its image file first, then its row (one INSERT, one round trip).
async function insertUser(client, record) {
  const image = await saveImage(record.image);
  await client.query('INSERT INTO users (name, email, image) VALUES ($1, $2, $3)',
    [nameOf(record), record.email, image]);
}

// Parses one line for split2; blank lines produce nothing.
function parseLine(line) {
  return line.trim() === '' ? undefined : JSON.parse(line);
}

async function start(name, app) {
  fs.mkdirSync(imagesDir, { recursive: true });
  await pool.query(CREATE_TABLE);
  app.listen(port, '127.0.0.1', () => console.log(`${name}: listening on 127.0.0.1:${port}`));
}

module.exports = { pool, imagesDir, nameOf, saveImage, insertUser, parseLine, start };
