-- The demo application's schema, the same in every data center.
CREATE TABLE users (
  user_id bigint PRIMARY KEY,
  email text NOT NULL,
  display_name text,
  country_code text,
  created_at timestamptz NOT NULL,
  profile jsonb
);
CREATE TABLE videos (
  video_id bigint PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users (user_id),
  title text NOT NULL,
  duration_s numeric(8,2),
  object_key text NOT NULL,
  created_at timestamptz NOT NULL
);
CREATE INDEX videos_user ON videos (user_id);
CREATE TABLE comments (
  comment_id bigint PRIMARY KEY,
  video_id bigint NOT NULL REFERENCES videos (video_id),
  author_id bigint NOT NULL,
  body text,
  created_at timestamptz NOT NULL
);
CREATE INDEX comments_video ON comments (video_id);
CREATE TABLE login_events (
  event_id bigint PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users (user_id),
  ip inet,
  at timestamptz NOT NULL,
  success boolean NOT NULL
);
CREATE INDEX login_events_user ON login_events (user_id);
CREATE TABLE devices (
  user_id bigint NOT NULL REFERENCES users (user_id),
  device_no int NOT NULL,
  phone text,
  model text,
  PRIMARY KEY (user_id, device_no)
);
