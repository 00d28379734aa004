-- Demo data for the SQL routes of demo/gateway.yaml. scripts/demo.sh loads it into
-- the database `app` as the role `app` (so `app` owns the tables) on every run, into a
-- fresh cluster. The rows are generated, but deterministically: every run has the
-- same 50 projects and the same tasks, so the README's example answers stay true.
\set ON_ERROR_STOP on

create table projects (
    id      integer primary key,
    name    text    not null unique,
    owner   text    not null,
    budget  numeric(12, 2) not null check (budget >= 0),
    active  boolean not null default true,
    meta    jsonb   not null default '{}',
    created date    not null
);

create table tasks (
    id         integer primary key,
    project_id integer not null references projects (id),
    title      text    not null,
    done       boolean not null default false,
    due        date
);
create index tasks_project_id on tasks (project_id);
create index projects_owner on projects (owner);

-- 50 projects: "<adjective>-<noun>" names, 8 owners, budgets between 5 000 and
-- 250 000, every fifth project inactive, a tier, a region and tags in meta.
insert into projects (id, name, owner, budget, active, meta, created)
select i,
       (array['amber', 'brisk', 'cobalt', 'dusty', 'ember', 'frosty', 'golden', 'hidden', 'ivory', 'jade'])[1 + (i - 1) % 10]
         || '-' ||
       (array['falcon', 'harbor', 'meadow', 'summit', 'canyon'])[1 + (i - 1) / 10],
       (array['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi'])[1 + (i * 5) % 8],
       round((5000 + (i * 7919) % 245000)::numeric, 2) + ((i * 37) % 100) / 100.0,
       i % 5 <> 0,
       jsonb_build_object(
         'tier',   (array['gold', 'silver', 'bronze'])[1 + i % 3],
         'region', (array['eu-west', 'us-east', 'ap-south', 'us-west'])[1 + i % 4],
         'tags',   jsonb_build_array((array['web', 'data', 'ml', 'mobile', 'infra'])[1 + i % 5],
                                     (array['api', 'batch', 'gpu'])[1 + i % 3])
       ),
       date '2023-01-02' + (i * 11)
from generate_series(1, 50) as i;

-- 0 to 4 tasks per project (id % 5 of them), about half done.
insert into tasks (id, project_id, title, done, due)
select row_number() over (order by p.id, t),
       p.id,
       (array['design review', 'write schema', 'load test', 'security audit'])[t] || ' for ' || p.name,
       (p.id + t) % 2 = 0,
       p.created + 30 * t
from projects p, generate_series(1, 4) as t
where t <= p.id % 5;

-- Aggregates for GET /api/stats and GET /api/owners.
create view owner_summary as
select owner,
       count(*)                      as projects,
       count(*) filter (where active) as active,
       sum(budget)                   as total_budget
from projects
group by owner;

analyze projects;
analyze tasks;
