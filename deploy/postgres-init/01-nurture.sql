-- Nurture's own database beside Temporal's (temporal, temporal_visibility are made by auto-setup).
CREATE DATABASE nurture OWNER nurture;
